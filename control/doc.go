// Package control is the vdrepl daemon's control API: the types that cross
// its unix socket, the HTTP handler the daemon serves there, and the Client
// that the CLI and doctor use.
//
// The daemon serves NewHandler(host) on its control socket, where host (a
// *daemon.Daemon) implements Host; a program that only talks to a daemon
// needs this package and not the daemon.
//
// # Routes
//
// JSON over HTTP/1.1 on a unix socket. A request body is one JSON value of
// at most 1 MiB with no unknown fields; an answer is one JSON value.
//
//	GET    /v1/status                             Status
//	GET    /v1/vms                                []VMInfo
//	POST   /v1/vms                                VMSpec -> VMSpec
//	DELETE /v1/vms/{name}
//	POST   /v1/vms/{name}/seal                    -> journal.CycleInfo
//	POST   /v1/vms/{name}/unfence[?force=1]       make a fenced VM writable
//	POST   /v1/mount                              MountEvent{Mountpoint} -> a stream
//	                                              of MountEvent lines (NDJSON): one
//	                                              when mounted, one when unmounted;
//	                                              the mount lives as long as the
//	                                              request.
//	POST   /v1/unmount                            MountEvent{Mountpoint}
//
//	GET    /v1/replication[?vm=NAME]              Replication
//	POST   /v1/vms/{name}/replication[?check=0]   ReplicationSpec -> ReplicationSpec
//	                                              (check=0: without asking the replica first)
//	PATCH  /v1/vms/{name}/replication             ReplicationChange -> ReplicationChanged
//	DELETE /v1/vms/{name}/replication
//	POST   /v1/vms/{name}/replication/sync[?app=1]  -> SyncResult once applied
//	POST   /v1/vms/{name}/replication/{op}        op: pause, resume, resync
//	POST   /v1/vms/{name}/verify                  VerifyRequest -> a stream of
//	                                              VerifyEvent lines (NDJSON):
//	                                              progress, then the result or
//	                                              the error; an error before the
//	                                              first line is a plain error.
//	POST   /v1/vms/{vm}/replication/reverse       ReplicationSpec -> ReplicationSpec
//	POST   /v1/vms/{vm}/replication/extend        ExtendSpec -> ExtendSpec
//	DELETE /v1/vms/{vm}/replication/extend
//	GET    /v1/replica/allow                      []apply.AllowEntry
//	POST   /v1/replica/allow                      apply.AllowEntry -> apply.AllowEntry
//	DELETE /v1/replica/allow?primary=PATTERN
//	POST   /v1/replica/import                     ImportRequest
//	DELETE /v1/replica/vms/{vm}[?delete_images=1] ReplicaRemoved: forget a replica
//	                                              VM kept here (its images stay
//	                                              unless delete_images=1); 409
//	                                              while it is failed over, in a
//	                                              test failover or extended
//
//	GET    /v1/nbd/allow                          []NBDAllowEntry
//	POST   /v1/nbd/allow                          NBDAllowEntry -> NBDAllowEntry
//	DELETE /v1/nbd/allow?client=PATTERN&export=PATTERN
//
//	GET    /v1/points/{vm}                        PointsInfo
//	POST   /v1/points/{vm}/{id}/verify            apply.PointCheck
//	POST   /v1/failover/{vm}/test[?point=ID]      FailoverResult
//	POST   /v1/failover/{vm}/stop-test
//	POST   /v1/failover/{vm}/unplanned[?point=ID] FailoverResult
//	POST   /v1/failover/{vm}/planned[?force=1][&reverse_to=HOST:PORT]  PlannedResult
//	POST   /v1/failover/{vm}/complete
//	POST   /v1/failover/{vm}/cancel
//
//	GET    /v1/doctor[?replica=HOST:PORT]...      DoctorInfo
//
// A route without an answer type answers {}. An error is a non-2xx status
// and {"error": "one line"}: 404 for ErrUnknownVM, 409 for ErrExists and
// ErrInUse, 400 for ErrInvalid (a body that does not decode is one), 500 for
// anything else. An unknown failover operation is a plain 404.
//
// # Concurrency
//
// The handler serves requests concurrently and calls Host from as many
// goroutines at once; a Client is safe for concurrent use.
package control
