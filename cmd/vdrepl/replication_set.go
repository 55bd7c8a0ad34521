package main

import (
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/vdrepl/vdrepl/control"
)

func replicationSetCmd() *cli.Command {
	return &cli.Command{
		Name:      "set",
		Usage:     "change a running replication (frequency, limits, recovery points, replica address) without a resync",
		ArgsUsage: "VM",
		Description: `Examples:
   vdrepl replication set web1 --frequency 30s --recovery-points 4
   vdrepl replication set web1 --bandwidth-limit 08:00-18:00=20MB/s,*=unlimited
   vdrepl replication set web1 --replica replica2.example.com:8443

Only the flags given change; the replication restarts with them at once and
goes on where it was (nothing is copied again). The recovery-point policy
reaches the replica with its next enable, right after the restart.

A new --replica address is asked about the VM first. When it holds the VM
for this host at the cycle last applied, it is the same replica reached
another way, and replication goes on. Otherwise it is another replica host:
refused, unless --force, and then a new initial copy to it follows.`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "replica", DefaultText: "unchanged", Usage: "the replica's new HOST:PORT (port 8443 if omitted)"},
			&cli.DurationFlag{Name: "frequency", DefaultText: "unchanged", Usage: "how often a cycle is shipped: 30s, 5m, 15m or any duration >= 1s"},
			&cli.BoolFlag{Name: "compression", DefaultText: "unchanged", Usage: "zstd-compress what is sent (--compression=false to turn off)"},
			&cli.BoolFlag{Name: "bypass-proxy", DefaultText: "unchanged", Usage: "connect directly even when HTTPS_PROXY is set (--bypass-proxy=false to go through it)"},
			&cli.StringFlag{Name: "bandwidth-limit", DefaultText: "unchanged", Usage: "cap this VM's shipping: 50MB/s, a schedule, or \"\" for none"},
			&cli.StringFlag{Name: "sync-bandwidth-limit", DefaultText: "unchanged", Usage: "the cap of initial copies and resyncs, or \"\" for none"},
			&cli.IntFlag{Name: "recovery-points", DefaultText: "unchanged", Usage: "recovery points the replica keeps besides the latest state, 0 to 24"},
			&cli.DurationFlag{Name: "recovery-point-interval", DefaultText: "unchanged", Usage: "one recovery point per this much time"},
			&cli.DurationFlag{Name: "verify-every", DefaultText: "unchanged", Usage: "run vdrepl verify on its own this long after the last one; 0 = only by hand"},
			&cli.StringFlag{Name: "app-consistent-every", DefaultText: "unchanged", Usage: "an application-consistent point every H hours (or a duration like 30m); 0 = never"},
			&cli.StringFlag{Name: "quiesce-cmd", DefaultText: "unchanged", Usage: "executable run as \"CMD VM freeze\" and \"CMD VM thaw\" (\"\" for none)"},
			&cli.StringFlag{Name: "qga-socket", DefaultText: "unchanged", Usage: "the guest's qemu-guest-agent socket (\"\" for none)"},
			&cli.BoolFlag{Name: "force", Usage: "accept a --replica that is another replica host: a new initial copy follows"},
			&cli.BoolFlag{Name: "json", Usage: "print JSON"},
		},
		Action: vmAction("replication set", primaryHost, replicationSetAction),
	}
}

func replicationSetAction(c *cli.Context) error {
	vm, err := oneVM(c, "replication set")
	if err != nil {
		return err
	}
	ch, err := replicationChange(c)
	if err != nil {
		return err
	}
	out, err := client(c).SetReplication(c.Context, vm, ch)
	if err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(c.App.Writer, out)
	}
	if len(out.Changed) == 0 {
		fmt.Fprintf(c.App.Writer, "replication of %s unchanged: it already runs with these settings\n", vm)
		return nil
	}
	var parts []string
	for _, f := range out.Changed {
		parts = append(parts, f+" "+settingText(out.Spec, f))
	}
	fmt.Fprintf(c.App.Writer, "replication of %s changed: %s\n", vm, strings.Join(parts, ", "))
	switch {
	case out.NewReplica:
		fmt.Fprintf(c.App.Writer, "%s is a new replica: an initial copy to it follows; watch it with: vdrepl replication status %s --watch\n", out.Spec.Replica, vm)
	case out.SameReplica:
		fmt.Fprintf(c.App.Writer, "%s is the same replica at a new address: replication goes on from there\n", out.Spec.Replica)
	}
	return nil
}

// settingText renders the new value of setting flag in spec.
func settingText(s control.ReplicationSpec, flag string) string {
	none := func(v string) string {
		if v == "" {
			return "(none)"
		}
		return v
	}
	switch flag {
	case "replica":
		return s.Replica
	case "frequency":
		return time.Duration(s.Frequency).String()
	case "compression":
		return fmt.Sprint(s.Compression)
	case "bypass-proxy":
		return fmt.Sprint(s.BypassProxy)
	case "bandwidth-limit":
		return none(s.BandwidthLimit)
	case "sync-bandwidth-limit":
		return none(s.SyncBandwidthLimit)
	case "recovery-points":
		return fmt.Sprint(s.RecoveryPoints)
	case "recovery-point-interval":
		return time.Duration(s.PointInterval).String()
	case "app-consistent-every":
		return time.Duration(s.AppConsistentEvery).String()
	case "quiesce-cmd":
		return none(s.QuiesceCmd)
	case "qga-socket":
		return none(s.QGASocket)
	case "verify-every":
		return time.Duration(s.VerifyEvery).String()
	}
	return ""
}

// replicationChange reads the flags given to `replication set`; a flag
// not given stays nil (unchanged).
func replicationChange(c *cli.Context) (control.ReplicationChange, error) {
	ch := control.ReplicationChange{Force: c.Bool("force")}
	str := func(name string) *string {
		if !c.IsSet(name) {
			return nil
		}
		v := c.String(name)
		return &v
	}
	dur := func(name string) *control.Duration {
		if !c.IsSet(name) {
			return nil
		}
		v := control.Duration(c.Duration(name))
		return &v
	}
	boolean := func(name string) *bool {
		if !c.IsSet(name) {
			return nil
		}
		v := c.Bool(name)
		return &v
	}
	if ch.Replica = str("replica"); ch.Replica != nil {
		*ch.Replica = withDefaultPort(*ch.Replica, "8443")
	}
	ch.Frequency = dur("frequency")
	ch.Compression = boolean("compression")
	ch.BypassProxy = boolean("bypass-proxy")
	ch.BandwidthLimit = str("bandwidth-limit")
	ch.SyncBandwidthLimit = str("sync-bandwidth-limit")
	if c.IsSet("recovery-points") {
		n := c.Int("recovery-points")
		ch.RecoveryPoints = &n
	}
	ch.PointInterval = dur("recovery-point-interval")
	ch.VerifyEvery = dur("verify-every")
	if s := str("app-consistent-every"); s != nil {
		d, err := parseHours(*s)
		if err != nil {
			return ch, fmt.Errorf("--app-consistent-every %q: %w", *s, err)
		}
		v := control.Duration(d)
		ch.AppConsistentEvery = &v
	}
	ch.QuiesceCmd, ch.QGASocket = str("quiesce-cmd"), str("qga-socket")
	for _, f := range []*string{ch.QuiesceCmd, ch.QGASocket} {
		if f != nil && *f != "" {
			abs, err := filepath.Abs(*f)
			if err != nil {
				return ch, err
			}
			*f = abs
		}
	}
	if ch.Replica == nil && ch.Frequency == nil && ch.Compression == nil && ch.BypassProxy == nil && ch.BandwidthLimit == nil &&
		ch.SyncBandwidthLimit == nil && ch.RecoveryPoints == nil && ch.PointInterval == nil && ch.AppConsistentEvery == nil &&
		ch.QuiesceCmd == nil && ch.QGASocket == nil && ch.VerifyEvery == nil {
		return ch, fmt.Errorf("replication set: give at least one setting to change (see vdrepl replication set --help)")
	}
	return ch, nil
}
