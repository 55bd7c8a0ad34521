package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"
	"golang.org/x/sys/unix"

	"github.com/vdrepl/vdrepl/apply"
	"github.com/vdrepl/vdrepl/control"
)

// withDefaultPort adds port to an address given without one.
func withDefaultPort(addr, port string) string {
	if _, _, err := net.SplitHostPort(addr); err == nil {
		return addr
	}
	return net.JoinHostPort(strings.Trim(addr, "[]"), port)
}

func oneVM(c *cli.Context, what string) (string, error) {
	if c.NArg() != 1 {
		return "", fmt.Errorf("%s takes exactly one VM name, got %d arguments", what, c.NArg())
	}
	return c.Args().First(), nil
}

func replicationCmd() *cli.Command {
	simple := func(op, usage string) *cli.Command {
		return &cli.Command{
			Name: op, Usage: usage, ArgsUsage: "VM",
			Description: "Example:\n   vdrepl replication " + op + " web1",
			Action: func(c *cli.Context) error {
				vm, err := oneVM(c, "replication "+op)
				if err != nil {
					return err
				}
				return client(c).ReplicationControl(c.Context, vm, op)
			},
		}
	}
	return &cli.Command{
		Name:  "replication",
		Usage: "enable, watch and control replication of VMs to a replica host",
		Description: `Example:
   vdrepl replication enable web1 --replica replica.example.com:8443 --frequency 30s
   vdrepl replication status --watch`,
		Subcommands: []*cli.Command{
			{
				Name:      "enable",
				Usage:     "start replicating a VM to a replica host",
				ArgsUsage: "VM",
				Description: `Example:
   vdrepl replication enable web1 --replica replica.example.com:8443 --frequency 30s

The replica must run ` + "`vdrepl serve --replica-listen ...`" + ` and allow this host:
   vdrepl replica allow add --primary THIS_HOST --storage /srv/replicas
--initial picks the first copy: network (now), at:2026-11-24T01:00:00Z,
offline:DIR (write it to DIR for external media, then run
` + "`vdrepl replication import-initial VM DIR`" + ` on the replica), or existing
(the replica already has the images, e.g. a restored backup: a checksum
resync brings them current).

Recovery points: --recovery-points 4 keeps four hourly points on the replica
besides the latest state; with --app-consistent-every 4 --quiesce-cmd
/usr/local/sbin/freeze-web1 one of them is application-consistent every four
hours (the guest frozen while the cycle is closed).`,
				Flags: []cli.Flag{
					&cli.StringFlag{Name: "replica", Required: true, Usage: "the replica's HOST:PORT (port 8443 if omitted)"},
					&cli.DurationFlag{Name: "frequency", Value: 5 * time.Minute, Usage: "how often a cycle is shipped: 30s, 5m, 15m or any duration >= 1s"},
					&cli.BoolFlag{Name: "compression", Value: true, Usage: "zstd-compress what is sent (--compression=false to turn off)"},
					&cli.StringSliceFlag{Name: "exclude-disk", Usage: "a disk not to replicate (repeatable)"},
					&cli.BoolFlag{Name: "bypass-proxy", Usage: "connect directly even when HTTPS_PROXY is set"},
					&cli.StringFlag{Name: "initial", Value: "network", Usage: "network | at:RFC3339 | offline:DIR | existing"},
					&cli.StringFlag{Name: "bandwidth-limit", Usage: "cap this VM's shipping: 50MB/s, or 08:00-18:00=20MB/s,*=unlimited"},
					&cli.StringFlag{Name: "sync-bandwidth-limit", Usage: "a lower cap for the initial copy and resyncs, so delta cycles are never starved"},
					&cli.IntFlag{Name: "recovery-points", Usage: "recovery points the replica keeps besides the latest state, 0 to 24"},
					&cli.DurationFlag{Name: "recovery-point-interval", Value: time.Hour, Usage: "one recovery point per this much time"},
					&cli.StringFlag{Name: "app-consistent-every", Usage: "take an application-consistent point every H hours (or a duration like 30m); needs --quiesce-cmd or --qga-socket"},
					&cli.StringFlag{Name: "quiesce-cmd", Usage: "executable run as `CMD VM freeze` and `CMD VM thaw` around an application-consistent barrier (e.g. a wrapper of fsfreeze)"},
					&cli.StringFlag{Name: "qga-socket", Usage: "the guest's qemu-guest-agent socket, for guest-fsfreeze-freeze/thaw"},
					&cli.BoolFlag{Name: "json", Usage: "print JSON"},
				},
				Action: func(c *cli.Context) error {
					vm, err := oneVM(c, "replication enable")
					if err != nil {
						return err
					}
					spec := control.ReplicationSpec{
						Replica:            withDefaultPort(c.String("replica"), "8443"),
						Frequency:          control.Duration(c.Duration("frequency")),
						Compression:        c.Bool("compression"),
						ExcludeDisks:       c.StringSlice("exclude-disk"),
						BypassProxy:        c.Bool("bypass-proxy"),
						Initial:            c.String("initial"),
						BandwidthLimit:     c.String("bandwidth-limit"),
						SyncBandwidthLimit: c.String("sync-bandwidth-limit"),
						RecoveryPoints:     c.Int("recovery-points"),
						PointInterval:      control.Duration(c.Duration("recovery-point-interval")),
						QuiesceCmd:         c.String("quiesce-cmd"),
						QGASocket:          c.String("qga-socket"),
					}
					if s := c.String("app-consistent-every"); s != "" {
						d, err := parseHours(s)
						if err != nil {
							return fmt.Errorf("--app-consistent-every %q: %w", s, err)
						}
						spec.AppConsistentEvery = control.Duration(d)
					}
					for _, f := range []*string{&spec.QuiesceCmd, &spec.QGASocket} {
						if *f != "" {
							abs, err := filepath.Abs(*f)
							if err != nil {
								return err
							}
							*f = abs
						}
					}
					if mode, dir, ok := strings.Cut(spec.Initial, ":"); ok && mode == "offline" {
						abs, err := filepath.Abs(dir)
						if err != nil {
							return err
						}
						spec.Initial = "offline:" + abs
					}
					out, err := client(c).EnableReplication(c.Context, vm, spec)
					if err != nil {
						return err
					}
					if c.Bool("json") {
						return printJSON(c.App.Writer, out)
					}
					fmt.Fprintf(c.App.Writer, "replication of %s to %s enabled (every %s, initial copy: %s)\nwatch it with: vdrepl replication status %s --watch\n",
						vm, out.Replica, time.Duration(out.Frequency), out.Initial, vm)
					return nil
				},
			},
			{
				Name:        "disable",
				Usage:       "stop replicating a VM (the replica keeps what it has)",
				ArgsUsage:   "VM",
				Description: "Example:\n   vdrepl replication disable web1",
				Action: func(c *cli.Context) error {
					vm, err := oneVM(c, "replication disable")
					if err != nil {
						return err
					}
					return client(c).DisableReplication(c.Context, vm)
				},
			},
			{
				Name:        "sync",
				Usage:       "close a cycle now and wait until the replica has applied it",
				ArgsUsage:   "VM",
				Description: "Example (in a script, after writing data that must be on the replica):\n   vdrepl replication sync web1",
				Flags: []cli.Flag{
					&cli.DurationFlag{Name: "timeout", Value: 0, Usage: "give up after this long (0 = wait as long as it takes)"},
					&cli.BoolFlag{Name: "app-consistent", Usage: "quiesce the guest for this cycle: an application-consistent recovery point"},
				},
				Action: func(c *cli.Context) error {
					vm, err := oneVM(c, "replication sync")
					if err != nil {
						return err
					}
					ctx, stop := signalContext(c)
					defer stop()
					if t := c.Duration("timeout"); t > 0 {
						var cancel func()
						ctx, cancel = contextWithTimeout(ctx, t)
						defer cancel()
					}
					cycle, err := client(c).SyncReplication(ctx, vm, c.Bool("app-consistent"))
					if err != nil {
						return err
					}
					fmt.Fprintf(c.App.Writer, "cycle %d of %s is applied on the replica\n", cycle, vm)
					return nil
				},
			},
			simple("pause", "stop shipping cycles for now (the journal keeps them)"),
			simple("resume", "ship again after pause, or retry now after an error"),
			simple("resync", "compare primary and replica by checksums now and send what differs"),
			pointsCmd(),
			reverseCmd(),
			extendCmd(),
			{
				Name:      "status",
				Usage:     "show replication health, lag and progress (the Measure-VMReplication of vdrepl)",
				ArgsUsage: "[VM]",
				Description: `Example:
   vdrepl replication status
   vdrepl replication status web1 --watch`,
				Flags: []cli.Flag{
					&cli.BoolFlag{Name: "json", Usage: "print JSON"},
					&cli.BoolFlag{Name: "watch", Usage: "refresh every 2 seconds until interrupted"},
				},
				Action: func(c *cli.Context) error {
					if c.NArg() > 1 {
						return errors.New("replication status takes at most one VM name")
					}
					vm := c.Args().First()
					ctx, stop := signalContext(c)
					defer stop()
					tty := isTerminal(os.Stdout)
					for {
						r, err := client(c).Replication(ctx, vm)
						if err != nil {
							if ctx.Err() != nil {
								return nil
							}
							return err
						}
						if c.Bool("json") {
							if err := printJSON(c.App.Writer, r); err != nil {
								return err
							}
						} else {
							if c.Bool("watch") && tty {
								fmt.Fprint(c.App.Writer, "\033[H\033[2J")
							}
							printReplication(c, r, tty)
						}
						if !c.Bool("watch") {
							return nil
						}
						select {
						case <-ctx.Done():
							return nil
						case <-time.After(2 * time.Second):
						}
					}
				},
			},
			{
				Name:      "import-initial",
				Usage:     "on the replica: load an initial copy written with --initial offline:DIR",
				ArgsUsage: "VM DIR",
				Description: `Example (on the replica, with the media mounted at /media/usb):
   vdrepl replication import-initial web1 /media/usb/web1`,
				Action: func(c *cli.Context) error {
					if c.NArg() != 2 {
						return errors.New("replication import-initial takes a VM name and a directory")
					}
					dir, err := filepath.Abs(c.Args().Get(1))
					if err != nil {
						return err
					}
					if err := client(c).ImportInitial(c.Context, c.Args().First(), dir); err != nil {
						return err
					}
					fmt.Fprintf(c.App.Writer, "initial copy of %s imported; the primary now ships the cycles since\n", c.Args().First())
					return nil
				},
			},
		},
	}
}

func replicaCmd() *cli.Command {
	return &cli.Command{
		Name:  "replica",
		Usage: "configure this host as a replica server (the Set-VMReplicationServer of vdrepl)",
		Description: `Example (the daemon runs with --replica-listen and its TLS flags):
   vdrepl replica allow add --primary host1.example.com --storage /srv/replicas/host1`,
		Subcommands: []*cli.Command{{
			Name:  "allow",
			Usage: "which primaries may replicate here, and where their replicas are stored",
			Description: `Example:
   vdrepl replica allow add --primary host1.example.com --storage /srv/replicas/host1
   vdrepl replica allow list`,
			Subcommands: []*cli.Command{
				{
					Name:  "add",
					Usage: "allow a primary (by certificate name) to replicate into a storage directory",
					Description: `Example:
   vdrepl replica allow add --primary host1.example.com --storage /srv/replicas/host1
   vdrepl replica allow add --primary '*.example.com' --storage /srv/replicas --trust-group dc1

--primary is matched against the primary's certificate name (CN or DNS SAN):
an exact name, *.domain for any name under domain, or * for any primary
whose certificate chains to --tls-ca. A primary can only ever write under
its entry's --storage directory. VMs may move between primaries of one
--trust-group (e.g. after a failover inside a cluster).`,
					Flags: []cli.Flag{
						&cli.StringFlag{Name: "primary", Required: true, Usage: "certificate name pattern: host, *.domain or *"},
						&cli.StringFlag{Name: "storage", Required: true, Usage: "directory for this primary's replica images"},
						&cli.StringFlag{Name: "trust-group", Usage: "VMs may move between primaries of this group"},
					},
					Action: func(c *cli.Context) error {
						if c.NArg() != 0 {
							return errors.New("replica allow add takes only flags")
						}
						storage, err := filepath.Abs(c.String("storage"))
						if err != nil {
							return err
						}
						return client(c).Allow(c.Context, apply.AllowEntry{Primary: c.String("primary"), Storage: storage, TrustGroup: c.String("trust-group")})
					},
				},
				{
					Name:  "list",
					Usage: "list the allow-list",
					Flags: []cli.Flag{&cli.BoolFlag{Name: "json", Usage: "print JSON"}},
					Description: `Example:
   vdrepl replica allow list --json`,
					Action: func(c *cli.Context) error {
						l, err := client(c).AllowList(c.Context)
						if err != nil {
							return err
						}
						if c.Bool("json") {
							if l == nil {
								l = []apply.AllowEntry{}
							}
							return printJSON(c.App.Writer, l)
						}
						tw := tabwriter.NewWriter(c.App.Writer, 0, 4, 2, ' ', 0)
						fmt.Fprintln(tw, "PRIMARY\tSTORAGE\tTRUST GROUP")
						for _, e := range l {
							fmt.Fprintf(tw, "%s\t%s\t%s\n", e.Primary, e.Storage, e.TrustGroup)
						}
						return tw.Flush()
					},
				},
				{
					Name:        "remove",
					Usage:       "remove a primary from the allow-list",
					Description: "Example:\n   vdrepl replica allow remove --primary host1.example.com",
					Flags:       []cli.Flag{&cli.StringFlag{Name: "primary", Required: true, Usage: "the pattern as listed"}},
					Action: func(c *cli.Context) error {
						return client(c).Disallow(c.Context, c.String("primary"))
					},
				},
			},
		}},
	}
}

func isTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// progressBar renders done/total as a one-line bar with rate and ETA.
func progressBar(done, total int64, rate float64, eta time.Duration) string {
	const width = 30
	if total <= 0 {
		return ""
	}
	n := int(float64(width) * float64(done) / float64(total))
	n = min(max(n, 0), width)
	bar := strings.Repeat("=", n) + strings.Repeat(" ", width-n)
	if n > 0 && n < width {
		bar = bar[:n-1] + ">" + bar[n:]
	}
	s := fmt.Sprintf("[%s] %3.0f%% %s / %s", bar, 100*float64(done)/float64(total), humanBytes(done), humanBytes(total))
	if rate > 0 {
		s += fmt.Sprintf("  %s/s", humanBytes(int64(rate)))
	}
	if eta > 0 {
		s += "  ETA " + eta.Round(time.Second).String()
	}
	return s
}

func contextWithTimeout(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, d)
}

// printReplication renders replication status for people.
func printReplication(c *cli.Context, r control.Replication, tty bool) {
	w := c.App.Writer
	now := time.Now()
	for _, p := range r.Primaries {
		s, m := p.Status, p.Status.Metrics
		fmt.Fprintf(w, "VM %s -> %s (%s)\n", p.VM, p.Spec.Replica, p.Role)
		fmt.Fprintf(w, "  state:        %s", s.State)
		if s.Reason != "" {
			fmt.Fprintf(w, " (%s)", s.Reason)
		}
		fmt.Fprintf(w, "\n  health:       %s\n", s.Health)
		fmt.Fprintf(w, "  frequency:    %s\n", time.Duration(p.Spec.Frequency))
		if s.LastApplied > 0 {
			fmt.Fprintf(w, "  last applied: cycle %d, sealed %s ago\n", s.LastApplied, now.Sub(s.LastAppliedSealed).Round(time.Second))
			fmt.Fprintf(w, "  lag:          %s (RPO achieved; frequency %s)\n", time.Duration(m.LagSeconds*float64(time.Second)).Round(time.Second), time.Duration(p.Spec.Frequency))
		}
		if s.Committing > 0 {
			fmt.Fprintf(w, "  applying:     cycle %d (uploaded; the replica is applying it)\n", s.Committing)
		}
		fmt.Fprintf(w, "  pending:      %s in %d cycle(s), journal cap %s\n", humanBytes(m.PendingBytes), m.PendingCycles, humanBytes(m.JournalCapBytes))
		fmt.Fprintf(w, "  cycles:       %d shipped, %d missed; size avg %s, max %s; latency avg %s\n",
			m.CyclesShippedTotal, m.CyclesMissedTotal, humanBytes(int64(m.AvgCycleWireBytes)), humanBytes(m.MaxCycleWireBytes),
			time.Duration(m.AvgLatencySeconds*float64(time.Second)).Round(time.Millisecond))
		if s.Sync != nil {
			what := "initial copy"
			if s.Sync.Kind == "resync" {
				what = "resync"
			}
			fmt.Fprintf(w, "  %s: piece %d of %d", what, s.Sync.Done, s.Sync.Pieces)
			if tty && m.SyncTotalBytes > 0 {
				fmt.Fprintf(w, "\n    %s", progressBar(m.SyncDoneBytes, m.SyncTotalBytes, m.SyncRate, time.Duration(m.SyncETASeconds*float64(time.Second))))
			} else if m.SyncTotalBytes > 0 {
				fmt.Fprintf(w, ", %s of %s", humanBytes(m.SyncDoneBytes), humanBytes(m.SyncTotalBytes))
			}
			fmt.Fprintln(w)
		}
		if s.Forecast != "" {
			fmt.Fprintf(w, "  forecast:     %s\n", s.Forecast)
		}
		if s.LastError != "" {
			fmt.Fprintf(w, "  last error:   %s (%s ago)\n", s.LastError, now.Sub(s.LastErrorAt).Round(time.Second))
		}
		if !s.NextRetry.IsZero() {
			fmt.Fprintf(w, "  next retry:   in %s\n", s.NextRetry.Sub(now).Round(time.Second))
		}
		if len(p.Excluded) > 0 {
			fmt.Fprintf(w, "  excluded:     %s\n", strings.Join(p.Excluded, ", "))
		}
		if p.Spec.RecoveryPoints > 0 {
			fmt.Fprintf(w, "  points:       %d kept on the replica, one per %s\n", p.Spec.RecoveryPoints, time.Duration(p.Spec.PointInterval))
		}
		if p.Spec.AppConsistentEvery > 0 {
			last := "none yet"
			if !s.LastAppConsistent.IsZero() {
				last = s.LastAppConsistent.Local().Format(time.DateTime)
			}
			fmt.Fprintf(w, "  app-consistent: every %s, last %s\n", time.Duration(p.Spec.AppConsistentEvery), last)
		}
		if s.QuiesceError != "" {
			fmt.Fprintf(w, "  quiesce:      %s\n", s.QuiesceError)
		}
	}
	for _, rep := range r.Replicas {
		fmt.Fprintf(w, "VM %s <- %s (replica)\n", rep.VM, rep.Primary)
		fmt.Fprintf(w, "  state:        %s, consistent: %v\n", rep.State, rep.Consistent)
		switch {
		case rep.Applied > 0 && !rep.AppliedAt.IsZero():
			fmt.Fprintf(w, "  applied:      cycle %d (barrier %s, %s ago)\n", rep.Applied, rep.AppliedAt.Local().Format(time.DateTime), now.Sub(rep.AppliedAt).Round(time.Second))
		case rep.Applied > 0:
			fmt.Fprintf(w, "  applied:      cycle %d (the base of an initial copy or resync)\n", rep.Applied)
		}
		if !rep.Consistent && rep.ConsistentAt > 0 {
			fmt.Fprintf(w, "  consistent once cycle %d is applied\n", rep.ConsistentAt)
		}
		if rep.Sync != nil {
			fmt.Fprintf(w, "  sync:         %s, %d of %d pieces\n", rep.Sync.Kind, len(rep.Sync.Done), rep.Sync.Pieces)
		}
		if rep.RecoveryPoints > 0 || rep.Points > 0 {
			fmt.Fprintf(w, "  points:       %d of %d kept, %s of undo data\n", rep.Points, rep.RecoveryPoints, humanBytes(rep.PointBytes))
		}
		if f := rep.FailedOver; f != nil {
			fmt.Fprintf(w, "  FAILED OVER:  %s failover at %s to %s; takes no data from %s\n", f.Kind, f.At.Local().Format(time.DateTime), apply.PointName(f.Point), rep.Primary)
		}
		if len(rep.Excluded) > 0 {
			fmt.Fprintf(w, "  not replicated (excluded on the primary): %s\n", strings.Join(rep.Excluded, ", "))
		}
	}
	if len(r.Primaries)+len(r.Replicas) == 0 {
		fmt.Fprintln(w, "no VM is replicated from or to this host")
	}
	for _, warn := range r.Warnings {
		fmt.Fprintf(w, "warning: %s\n", warn)
	}
}
