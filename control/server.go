package control

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"time"

	"github.com/vdrepl/vdrepl/apply"
	"github.com/vdrepl/vdrepl/journal"
)

// Host is what the handler asks of the daemon, one small interface per
// group of routes.
type Host interface {
	VMHost
	MountHost
	ReplicationHost
	FailoverHost
	VerifyHost
	NBDAccessHost
	// DoctorInfo reports the configuration and, for the replica
	// addresses given and those of replicated VMs, the proxy it would use.
	DoctorInfo(replicas []string) DoctorInfo
}

// VMHost keeps the registered VMs.
type VMHost interface {
	Status() Status
	VMs() []VMInfo
	AddVM(VMSpec) (VMSpec, error)
	RemoveVM(name string) error
	// Unfence makes a fenced VM writable again (force must be set: the
	// admin accepts the split brain it risks).
	Unfence(name string, force bool) error
	Seal(name string, flags uint64) (journal.CycleInfo, error)
}

// MountHost mounts the VMs' disks as files.
type MountHost interface {
	// Mount mounts the disks at mountpoint, calls mounted (on the
	// calling goroutine) once they are there and returns when the mount has ended: when ctx is done (it
	// unmounts) or something else unmounted it. When it cannot mount it
	// returns the error without calling mounted.
	Mount(ctx context.Context, mountpoint string, mounted func()) error
	// Unmount ends the mount at mountpoint.
	Unmount(mountpoint string) error
}

// ReplicationHost replicates VMs as their primary and keeps replicas.
type ReplicationHost interface {
	ReplicationStatus(vm string) (Replication, error)
	// EnableReplication enables replication; with check it first asks
	// the replica whether it answers and takes this primary for vm.
	EnableReplication(ctx context.Context, vm string, s ReplicationSpec, check bool) (ReplicationSpec, error)
	SetReplication(ctx context.Context, vm string, c ReplicationChange) (ReplicationChanged, error)
	DisableReplication(vm string) error
	SyncReplication(ctx context.Context, vm string, app bool) (uint64, error)
	ReplicationControl(vm, op string) error
	AllowList() []apply.AllowEntry
	Allow(apply.AllowEntry) error
	Disallow(pattern string) error
	ImportInitial(vm, dir string) error
	// RemoveReplica forgets a replica VM kept on this host; with
	// deleteImages its images (inside its replica directory) go too.
	RemoveReplica(vm string, deleteImages bool) (ReplicaRemoved, error)
}

// FailoverHost runs failovers, reverse and extended replication.
type FailoverHost interface {
	Points(vm string) (PointsInfo, error)
	// VerifyPoint reads recovery point id back and compares its roots
	// with the ones recorded when it was taken.
	VerifyPoint(ctx context.Context, vm, id string) (apply.PointCheck, error)
	FailoverTest(vm, point string) (FailoverResult, error)
	StopTest(vm string) error
	FailoverUnplanned(vm, point string) (FailoverResult, error)
	FailoverPlanned(ctx context.Context, vm string, force bool, reverseTo string) (PlannedResult, error)
	CompleteFailover(vm string) error
	CancelFailover(vm string) error
	Reverse(vm string, s ReplicationSpec) (ReplicationSpec, error)
	ExtendReplication(vm string, s ExtendSpec) (ExtendSpec, error)
	StopExtend(vm string) error
}

// NewHandler returns the control API (the routes in the package doc)
// served by h.
func NewHandler(h Host) *http.ServeMux {
	mux := http.NewServeMux()
	vmRoutes(mux, h)
	mountRoutes(mux, h)
	replicationRoutes(mux, h)
	failoverRoutes(mux, h)
	verifyRoutes(mux, h)
	nbdRoutes(mux, h)
	mux.HandleFunc("GET /v1/doctor", func(w http.ResponseWriter, r *http.Request) {
		reply(w, h.DoctorInfo(r.URL.Query()["replica"]), nil)
	})
	return mux
}

func vmRoutes(mux *http.ServeMux, h VMHost) {
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) {
		reply(w, h.Status(), nil)
	})
	mux.HandleFunc("GET /v1/vms", func(w http.ResponseWriter, r *http.Request) {
		reply(w, h.VMs(), nil)
	})
	mux.HandleFunc("POST /v1/vms", decoded(func(_ *http.Request, s VMSpec) (any, error) {
		return h.AddVM(s)
	}))
	mux.HandleFunc("DELETE /v1/vms/{name}", func(w http.ResponseWriter, r *http.Request) {
		reply(w, struct{}{}, h.RemoveVM(r.PathValue("name")))
	})
	mux.HandleFunc("POST /v1/vms/{name}/unfence", func(w http.ResponseWriter, r *http.Request) {
		reply(w, struct{}{}, h.Unfence(r.PathValue("name"), r.URL.Query().Get("force") == "1"))
	})
	mux.HandleFunc("POST /v1/vms/{name}/seal", func(w http.ResponseWriter, r *http.Request) {
		info, err := h.Seal(r.PathValue("name"), 0)
		reply(w, info, err)
	})
}

func mountRoutes(mux *http.ServeMux, h MountHost) {
	mux.HandleFunc("POST /v1/mount", func(w http.ResponseWriter, r *http.Request) {
		var req MountEvent
		if err := decode(r, &req); err != nil {
			reply(w, nil, err)
			return
		}
		mp := filepath.Clean(req.Mountpoint)
		enc := json.NewEncoder(w)
		mounted := false
		err := h.Mount(r.Context(), req.Mountpoint, func() {
			mounted = true
			w.Header().Set("Content-Type", "application/x-ndjson")
			enc.Encode(MountEvent{Mounted: mp})
			if f, ok := w.(http.Flusher); ok {
				f.Flush()
			}
		})
		if !mounted {
			reply(w, nil, err)
			return
		}
		enc.Encode(MountEvent{Unmounted: mp})
	})
	mux.HandleFunc("POST /v1/unmount", decoded(func(_ *http.Request, req MountEvent) (any, error) {
		return struct{}{}, h.Unmount(req.Mountpoint)
	}))
}

func replicationRoutes(mux *http.ServeMux, h ReplicationHost) {
	mux.HandleFunc("GET /v1/replication", func(w http.ResponseWriter, r *http.Request) {
		out, err := h.ReplicationStatus(r.URL.Query().Get("vm"))
		reply(w, out, err)
	})
	mux.HandleFunc("POST /v1/vms/{name}/replication", decoded(func(r *http.Request, spec ReplicationSpec) (any, error) {
		return h.EnableReplication(r.Context(), r.PathValue("name"), spec, r.URL.Query().Get("check") != "0")
	}))
	mux.HandleFunc("PATCH /v1/vms/{name}/replication", decoded(func(r *http.Request, c ReplicationChange) (any, error) {
		return h.SetReplication(r.Context(), r.PathValue("name"), c)
	}))
	mux.HandleFunc("DELETE /v1/vms/{name}/replication", func(w http.ResponseWriter, r *http.Request) {
		reply(w, struct{}{}, h.DisableReplication(r.PathValue("name")))
	})
	mux.HandleFunc("POST /v1/vms/{name}/replication/sync", func(w http.ResponseWriter, r *http.Request) {
		ctx := r.Context()
		if t := r.URL.Query().Get("timeout"); t != "" {
			d, err := time.ParseDuration(t)
			if err != nil || d <= 0 {
				reply(w, nil, fmt.Errorf("%w: timeout %q: want a positive duration such as 30s", ErrInvalid, t))
				return
			}
			var cancel context.CancelFunc
			ctx, cancel = context.WithTimeout(ctx, d)
			defer cancel()
		}
		c, err := h.SyncReplication(ctx, r.PathValue("name"), r.URL.Query().Get("app") == "1")
		reply(w, SyncResult{Cycle: c}, err)
	})
	mux.HandleFunc("POST /v1/vms/{name}/replication/{op}", func(w http.ResponseWriter, r *http.Request) {
		reply(w, struct{}{}, h.ReplicationControl(r.PathValue("name"), r.PathValue("op")))
	})
	mux.HandleFunc("GET /v1/replica/allow", func(w http.ResponseWriter, r *http.Request) {
		reply(w, h.AllowList(), nil)
	})
	mux.HandleFunc("POST /v1/replica/allow", decoded(func(_ *http.Request, e apply.AllowEntry) (any, error) {
		return e, h.Allow(e)
	}))
	mux.HandleFunc("DELETE /v1/replica/allow", func(w http.ResponseWriter, r *http.Request) {
		reply(w, struct{}{}, h.Disallow(r.URL.Query().Get("primary")))
	})
	mux.HandleFunc("DELETE /v1/replica/vms/{vm}", func(w http.ResponseWriter, r *http.Request) {
		out, err := h.RemoveReplica(r.PathValue("vm"), r.URL.Query().Get("delete_images") == "1")
		reply(w, out, err)
	})
	mux.HandleFunc("POST /v1/replica/import", decoded(func(_ *http.Request, req ImportRequest) (any, error) {
		return struct{}{}, h.ImportInitial(req.VM, req.Dir)
	}))
}

func failoverRoutes(mux *http.ServeMux, h FailoverHost) {
	mux.HandleFunc("POST /v1/vms/{vm}/replication/extend", decoded(func(r *http.Request, spec ExtendSpec) (any, error) {
		return h.ExtendReplication(r.PathValue("vm"), spec)
	}))
	mux.HandleFunc("DELETE /v1/vms/{vm}/replication/extend", func(w http.ResponseWriter, r *http.Request) {
		reply(w, struct{}{}, h.StopExtend(r.PathValue("vm")))
	})
	mux.HandleFunc("POST /v1/vms/{vm}/replication/reverse", decoded(func(r *http.Request, spec ReplicationSpec) (any, error) {
		return h.Reverse(r.PathValue("vm"), spec)
	}))
	mux.HandleFunc("GET /v1/points/{vm}", func(w http.ResponseWriter, r *http.Request) {
		out, err := h.Points(r.PathValue("vm"))
		reply(w, out, err)
	})
	mux.HandleFunc("POST /v1/points/{vm}/{id}/verify", func(w http.ResponseWriter, r *http.Request) {
		out, err := h.VerifyPoint(r.Context(), r.PathValue("vm"), r.PathValue("id"))
		reply(w, out, err)
	})
	// One pattern for every operation, so that any other method on
	// /v1/failover/VM/OP is a 405 and an unknown OP a 404.
	mux.HandleFunc("POST /v1/failover/{vm}/{op}", func(w http.ResponseWriter, r *http.Request) {
		vm, point := r.PathValue("vm"), r.URL.Query().Get("point")
		var out any = struct{}{}
		var err error
		switch op := r.PathValue("op"); op {
		case "test":
			out, err = h.FailoverTest(vm, point)
		case "stop-test":
			err = h.StopTest(vm)
		case "unplanned":
			out, err = h.FailoverUnplanned(vm, point)
		case "planned":
			out, err = h.FailoverPlanned(r.Context(), vm, r.URL.Query().Get("force") == "1", r.URL.Query().Get("reverse_to"))
		case "complete":
			err = h.CompleteFailover(vm)
		case "cancel":
			err = h.CancelFailover(vm)
		default:
			http.NotFound(w, r)
			return
		}
		reply(w, out, err)
	})
}

// decoded serves a route whose request body is one T: a body that does
// not decode is answered as ErrInvalid, else what serve returns.
func decoded[T any](serve func(r *http.Request, in T) (any, error)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var in T
		if err := decode(r, &in); err != nil {
			reply(w, nil, err)
			return
		}
		out, err := serve(r, in)
		reply(w, out, err)
	}
}

// decode reads a request body of at most 1 MiB; a body that does not
// decode is ErrInvalid.
func decode(r *http.Request, v any) error {
	dec := json.NewDecoder(io.LimitReader(r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%w: %v", ErrInvalid, err)
	}
	return nil
}

// reply answers v, or the error with its status (see the package doc).
func reply(w http.ResponseWriter, v any, err error) {
	w.Header().Set("Content-Type", "application/json")
	if err != nil {
		code := http.StatusInternalServerError
		switch {
		case errors.Is(err, ErrUnknownVM):
			code = http.StatusNotFound
		case errors.Is(err, ErrExists), errors.Is(err, ErrInUse):
			code = http.StatusConflict
		case errors.Is(err, ErrInvalid):
			code = http.StatusBadRequest
		}
		w.WriteHeader(code)
		v = apiError{Error: err.Error()}
	}
	json.NewEncoder(w).Encode(v)
}
