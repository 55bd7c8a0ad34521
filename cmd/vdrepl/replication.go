package main

import (
	"errors"
	"fmt"
	"math"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/vdrepl/vdrepl/control"
	"github.com/vdrepl/vdrepl/internal/units"
)

func replicationCmd() *cli.Command {
	return &cli.Command{
		Name:  "replication",
		Usage: "enable, watch and control replication of VMs to a replica host",
		Description: `Example:
   vdrepl replication enable web1 --replica replica.example.com:8443 --frequency 30s
   vdrepl replication status --watch`,
		Subcommands: []*cli.Command{
			replicationEnableCmd(),
			replicationSetCmd(),
			replicationDisableCmd(),
			replicationSyncCmd(),
			replicationControlCmd("pause", "stop shipping cycles for now (the journal keeps them)"),
			replicationControlCmd("resume", "ship again after pause, or retry now after an error"),
			replicationControlCmd("resync", "compare primary and replica by checksums now and send what differs"),
			pointsCmd(),
			reverseCmd(),
			extendCmd(),
			replicationStatusCmd(),
			replicationImportInitialCmd(),
		},
	}
}

func replicationEnableCmd() *cli.Command {
	return &cli.Command{
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
hours (the guest frozen while the cycle is closed).

Before enabling, the daemon asks the replica about the VM as replication
would: a replica that does not answer, fails the TLS handshake, or does not
let this host in for the VM (its allow-list) is named with the fix, and
nothing is enabled. --no-check skips that question.`,
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
			&cli.DurationFlag{Name: "verify-every", Usage: "run vdrepl verify on its own this long after the last one (e.g. 24h, at least 1m; 0 = only when run by hand)"},
			&cli.StringFlag{Name: "app-consistent-every", Usage: "take an application-consistent point every H hours (or a duration like 30m); needs --quiesce-cmd or --qga-socket"},
			&cli.StringFlag{Name: "quiesce-cmd", Usage: "executable run as \"CMD VM freeze\" and \"CMD VM thaw\" around an application-consistent barrier (e.g. a wrapper of fsfreeze)"},
			&cli.StringFlag{Name: "qga-socket", Usage: "the guest's qemu-guest-agent socket, for guest-fsfreeze-freeze/thaw"},
			&cli.BoolFlag{Name: "no-check", Usage: "enable without asking the replica first whether it answers and takes this host (with --initial offline:DIR a replica that does not answer is accepted anyway)"},
			&cli.BoolFlag{Name: "json", Usage: "print JSON"},
		},
		Action: vmAction("replication enable", eitherHost, replicationEnableAction),
	}
}

func replicationEnableAction(c *cli.Context) error {
	vm, err := oneVM(c, "replication enable")
	if err != nil {
		return err
	}
	spec, err := replicationSpec(c)
	if err != nil {
		return err
	}
	out, err := client(c).EnableReplication(c.Context, vm, spec, !c.Bool("no-check"))
	if err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(c.App.Writer, out)
	}
	fmt.Fprintf(c.App.Writer, "replication of %s to %s enabled (every %s, initial copy: %s)\nwatch it with: vdrepl replication status %s --watch\n",
		vm, out.Replica, time.Duration(out.Frequency), out.Initial, vm)
	return nil
}

// replicationSpec reads the flags of `replication enable` into a spec, with
// the paths in it made absolute (the daemon runs elsewhere).
func replicationSpec(c *cli.Context) (control.ReplicationSpec, error) {
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
	spec.VerifyEvery = control.Duration(c.Duration("verify-every"))
	if s := c.String("app-consistent-every"); s != "" {
		d, err := parseHours(s)
		if err != nil {
			return spec, fmt.Errorf("--app-consistent-every %q: %w", s, err)
		}
		spec.AppConsistentEvery = control.Duration(d)
	}
	for _, f := range []*string{&spec.QuiesceCmd, &spec.QGASocket} {
		if *f != "" {
			abs, err := filepath.Abs(*f)
			if err != nil {
				return spec, err
			}
			*f = abs
		}
	}
	if mode, dir, ok := strings.Cut(spec.Initial, ":"); ok && mode == "offline" {
		abs, err := filepath.Abs(dir)
		if err != nil {
			return spec, err
		}
		spec.Initial = "offline:" + abs
	}
	return spec, nil
}

// parseHours reads --app-consistent-every: a number of hours ("4", "0.5")
// or a Go duration ("30m", "1h30m").
func parseHours(s string) (time.Duration, error) {
	if h, err := strconv.ParseFloat(s, 64); err == nil {
		if math.IsNaN(h) || h < 0 || h > 24*365*10 {
			return 0, fmt.Errorf("want hours from 0 to 87600")
		}
		return time.Duration(h * float64(time.Hour)), nil
	}
	d, err := time.ParseDuration(s)
	if err != nil || d < 0 {
		return 0, fmt.Errorf("want a number of hours (4) or a duration (30m)")
	}
	return d, nil
}

func replicationDisableCmd() *cli.Command {
	return &cli.Command{
		Name:        "disable",
		Usage:       "stop replicating a VM (the replica keeps what it has)",
		ArgsUsage:   "VM",
		Description: "Example:\n   vdrepl replication disable web1",
		Action:      vmAction("replication disable", eitherHost, replicationDisableAction),
	}
}

func replicationDisableAction(c *cli.Context) error {
	vm, err := oneVM(c, "replication disable")
	if err != nil {
		return err
	}
	cl := client(c)
	// Where the replica is, asked before it is forgotten: the success line
	// names the host on which `replica remove` is run.
	replica := ""
	if rep, err := cl.Replication(c.Context, vm); err == nil {
		for _, p := range rep.Primaries {
			if p.VM == vm && p.Spec.Replica != "" {
				replica = p.Spec.Replica
			}
		}
	}
	if err := cl.DisableReplication(c.Context, vm); err != nil {
		return err
	}
	fmt.Fprintf(c.App.Writer, "replication of %s disabled; %s\n", vm, disabledReplicaHint(vm, replica))
	return nil
}

// disabledReplicaHint says what became of the replica after a disable:
// it is kept there until removed there.
func disabledReplicaHint(vm, replica string) string {
	where := "the replica host"
	if replica != "" {
		where = "the replica on " + replica
	}
	return fmt.Sprintf("%s keeps %s's replica; remove it there with `vdrepl replica remove %s`", where, vm, vm)
}

func replicationSyncCmd() *cli.Command {
	return &cli.Command{
		Name:        "sync",
		Usage:       "close a cycle now and wait until the replica has applied it",
		ArgsUsage:   "VM",
		Description: "Example (in a script, after writing data that must be on the replica):\n   vdrepl replication sync web1",
		Flags: []cli.Flag{
			&cli.DurationFlag{Name: "timeout", Value: 0, Usage: "give up after this long (0 = wait as long as it takes)"},
			&cli.BoolFlag{Name: "app-consistent", Usage: "quiesce the guest for this cycle: an application-consistent recovery point"},
		},
		Action: vmAction("replication sync", primaryHost, replicationSyncAction),
	}
}

func replicationSyncAction(c *cli.Context) error {
	vm, err := oneVM(c, "replication sync")
	if err != nil {
		return err
	}
	ctx, stop := signalContext(c)
	defer stop()
	cycle, err := client(c).SyncReplication(ctx, vm, c.Bool("app-consistent"), c.Duration("timeout"))
	if err != nil {
		return err
	}
	fmt.Fprintf(c.App.Writer, "cycle %d of %s is applied on the replica\n", cycle, vm)
	return nil
}

// replicationControlCmd is `vdrepl replication OP VM` for the operations
// that take nothing but the VM: pause, resume and resync.
func replicationControlCmd(op, usage string) *cli.Command {
	return &cli.Command{
		Name: op, Usage: usage, ArgsUsage: "VM",
		Description: "Example:\n   vdrepl replication " + op + " web1",
		Action:      vmAction("replication "+op, primaryHost, replicationControlAction(op)),
	}
}

func replicationControlAction(op string) cli.ActionFunc {
	return func(c *cli.Context) error {
		vm, err := oneVM(c, "replication "+op)
		if err != nil {
			return err
		}
		if err := client(c).ReplicationControl(c.Context, vm, op); err != nil {
			return err
		}
		fmt.Fprintf(c.App.Writer, "%s\n", map[string]string{
			"pause":  "replication of " + vm + " paused; its journal keeps the cycles",
			"resume": "replication of " + vm + " resumed",
			"resync": "resync of " + vm + " requested; follow it with: vdrepl replication status " + vm,
		}[op])
		return nil
	}
}

// pointsCmd is `vdrepl replication points VM`, run on the replica host.
func pointsCmd() *cli.Command {
	return &cli.Command{
		Name:      "points",
		Usage:     "list a replica VM's recovery points (on the replica host)",
		ArgsUsage: "VM",
		Description: `Example:
   vdrepl replication points web1
   vdrepl failover test web1 --point 1234     # then boot from export web1-test/DISK`,
		Flags:  []cli.Flag{&cli.BoolFlag{Name: "json", Usage: "print JSON"}},
		Action: vmAction("replication points", replicaHost, pointsAction),
	}
}

func pointsAction(c *cli.Context) error {
	vm, err := oneVM(c, "replication points")
	if err != nil {
		return err
	}
	p, err := client(c).Points(c.Context, vm)
	if err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(c.App.Writer, p)
	}
	w := tabwriter.NewWriter(c.App.Writer, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "ID\tTIME\tKIND\tSIZE")
	for i := len(p.Points) - 1; i >= 0; i-- {
		pt := p.Points[i]
		kind := "standard"
		if pt.AppConsistent {
			kind = "application-consistent"
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\n", pt.ID, pt.Time.Local().Format(time.DateTime), kind, units.FormatBytes(pt.OwnBytes))
	}
	w.Flush()
	fmt.Fprintf(c.App.Writer, "%d point(s) besides the latest state (policy keeps %d), %s of undo data\n", len(p.Points), p.Keep, units.FormatBytes(p.Bytes))
	return nil
}

// reverseCmd is `vdrepl replication reverse VM --replica OLD_PRIMARY`.
func reverseCmd() *cli.Command {
	return &cli.Command{
		Name:      "reverse",
		Usage:     "after a failover to this host, replicate the VM back to its old primary, sending only blocks that differ",
		ArgsUsage: "VM",
		Description: `Example (on the host the VM failed over to):
   vdrepl replication reverse web1 --replica old-primary.example.com:8443 --frequency 5m
The failover is completed (its recovery points discarded). The old primary
must run the replica role and allow this host; once nothing uses the VM
there, it keeps its images as the replica and a checksum resync sends only
what differs.`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "replica", Required: true, Usage: "the old primary's HOST:PORT (port 8443 if omitted)"},
			&cli.DurationFlag{Name: "frequency", Value: 5 * time.Minute, Usage: "how often a cycle is shipped"},
			&cli.BoolFlag{Name: "compression", Value: true, Usage: "zstd-compress what is sent"},
			&cli.BoolFlag{Name: "bypass-proxy", Usage: "connect directly even when HTTPS_PROXY is set"},
			&cli.IntFlag{Name: "recovery-points", Usage: "recovery points the old primary keeps, 0 to 24"},
			&cli.DurationFlag{Name: "recovery-point-interval", Value: time.Hour, Usage: "one recovery point per this much time"},
			&cli.BoolFlag{Name: "json", Usage: "print JSON"},
		},
		Action: vmAction("replication reverse", eitherHost, reverseAction),
	}
}

func reverseAction(c *cli.Context) error {
	vm, err := oneVM(c, "replication reverse")
	if err != nil {
		return err
	}
	out, err := client(c).Reverse(c.Context, vm, control.ReplicationSpec{
		Replica:        withDefaultPort(c.String("replica"), "8443"),
		Frequency:      control.Duration(c.Duration("frequency")),
		Compression:    c.Bool("compression"),
		BypassProxy:    c.Bool("bypass-proxy"),
		RecoveryPoints: c.Int("recovery-points"),
		PointInterval:  control.Duration(c.Duration("recovery-point-interval")),
	})
	if err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(c.App.Writer, out)
	}
	fmt.Fprintf(c.App.Writer, "replication of %s back to %s enabled; a checksum resync sends what differs\nwatch it with: vdrepl replication status %s --watch\n", vm, out.Replica, vm)
	return nil
}

// extendCmd is `vdrepl replication extend VM --replica THIRD`.
func extendCmd() *cli.Command {
	return &cli.Command{
		Name:      "extend",
		Usage:     "on a replica host: pass what this host applies of a VM on to a third host (extended replication)",
		ArgsUsage: "VM",
		Description: `Example (on the replica host; the third host allows this one):
   vdrepl replication extend web1 --replica dr2.example.com:8443 --frequency 15m
   vdrepl replication extend web1 --stop
The third host gets an initial copy, then every cycle this host applied,
cut only between the primary's cycles; when the primary and this host are
lost, ` + "`vdrepl failover unplanned web1`" + ` on the third host brings it back.`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "replica", Usage: "the third host's HOST:PORT (port 8443 if omitted)"},
			&cli.DurationFlag{Name: "frequency", Value: 5 * time.Minute, Usage: "how often a cycle is passed on: 5m or 15m (any duration >= 1s)"},
			&cli.BoolFlag{Name: "compression", Value: true, Usage: "zstd-compress what is sent"},
			&cli.BoolFlag{Name: "bypass-proxy", Usage: "connect directly even when HTTPS_PROXY is set"},
			&cli.BoolFlag{Name: "stop", Usage: "stop extending replication of the VM"},
			&cli.BoolFlag{Name: "json", Usage: "print JSON"},
		},
		Action: vmAction("replication extend", replicaHost, extendAction),
	}
}

func extendAction(c *cli.Context) error {
	vm, err := oneVM(c, "replication extend")
	if err != nil {
		return err
	}
	if c.Bool("stop") {
		if err := client(c).StopExtend(c.Context, vm); err != nil {
			return err
		}
		fmt.Fprintf(c.App.Writer, "extended replication of %s stopped\n", vm)
		return nil
	}
	if c.String("replica") == "" {
		return fmt.Errorf("replication extend needs --replica HOST:PORT (or --stop)")
	}
	out, err := client(c).Extend(c.Context, vm, control.ExtendSpec{
		Replica:     withDefaultPort(c.String("replica"), "8443"),
		Frequency:   control.Duration(c.Duration("frequency")),
		Compression: c.Bool("compression"),
		BypassProxy: c.Bool("bypass-proxy"),
	})
	if err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(c.App.Writer, out)
	}
	fmt.Fprintf(c.App.Writer, "replication of %s extended to %s (every %s)\nwatch it with: vdrepl replication status %s\n", vm, out.Replica, time.Duration(out.Frequency), vm)
	return nil
}

func replicationImportInitialCmd() *cli.Command {
	return &cli.Command{
		Name:      "import-initial",
		Usage:     "on the replica: load an initial copy written with --initial offline:DIR",
		ArgsUsage: "VM DIR",
		Description: `Example (on the replica, with the media mounted at /media/usb):
   vdrepl replication import-initial web1 /media/usb/web1`,
		Action: vmAction("replication import-initial", eitherHost, replicationImportInitialAction),
	}
}

func replicationImportInitialAction(c *cli.Context) error {
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
}
