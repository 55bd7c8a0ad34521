package main

import (
	"fmt"
	"math"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/vdrepl/vdrepl/apply"
	"github.com/vdrepl/vdrepl/control"
)

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

// pointsCmd is `vdrepl replication points VM`, run on the replica host.
func pointsCmd() *cli.Command {
	return &cli.Command{
		Name:      "points",
		Usage:     "list a replica VM's recovery points (on the replica host)",
		ArgsUsage: "VM",
		Description: `Example:
   vdrepl replication points web1
   vdrepl failover test web1 --point 1234     # then boot from export web1-test/DISK`,
		Flags: []cli.Flag{&cli.BoolFlag{Name: "json", Usage: "print JSON"}},
		Action: func(c *cli.Context) error {
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
				fmt.Fprintf(w, "%s\t%s\t%s\t%s\n", pt.ID, pt.Time.Local().Format(time.DateTime), kind, humanBytes(pt.OwnBytes))
			}
			w.Flush()
			fmt.Fprintf(c.App.Writer, "%d point(s) besides the latest state (policy keeps %d), %s of undo data\n", len(p.Points), p.Keep, humanBytes(p.Bytes))
			return nil
		},
	}
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
		Action: func(c *cli.Context) error {
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
		},
	}
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
		Action: func(c *cli.Context) error {
			vm, err := oneVM(c, "replication extend")
			if err != nil {
				return err
			}
			if c.Bool("stop") {
				return client(c).StopExtend(c.Context, vm)
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
		},
	}
}

func failoverCmd() *cli.Command {
	pointFlag := &cli.StringFlag{Name: "point", Usage: "recovery point ID from `vdrepl replication points` (default: the latest state)"}
	jsonFlag := &cli.BoolFlag{Name: "json", Usage: "print JSON"}
	run := func(op, what string) cli.ActionFunc {
		return func(c *cli.Context) error {
			vm, err := oneVM(c, "failover "+op)
			if err != nil {
				return err
			}
			res, err := client(c).Failover(c.Context, vm, op, c.String("point"))
			if err != nil {
				return err
			}
			if c.Bool("json") {
				return printJSON(c.App.Writer, res)
			}
			switch op {
			case "test", "unplanned":
				fmt.Fprintf(c.App.Writer, "%s of %s from %s: exports %s\n", what, vm, apply.PointName(res.Point), strings.Join(res.Exports, ", "))
				if len(res.Lacks) > 0 {
					fmt.Fprintf(c.App.Writer, "warning: the VM lacks disk(s) %s: they were excluded from replication\n", strings.Join(res.Lacks, ", "))
				}
			default:
				fmt.Fprintf(c.App.Writer, "%s: %s\n", vm, what)
			}
			return nil
		}
	}
	return &cli.Command{
		Name:  "failover",
		Usage: "test, unplanned failover of a VM to this replica host, and its completion or cancel",
		Description: `Run on the replica host. Example, the primary lost:
   vdrepl failover unplanned web1 --point 1234   # web1/DISK served read-write here
   vdrepl failover complete web1                 # keep it: the other points are discarded
Example, a drill while replication goes on:
   vdrepl failover test web1                     # boot a VM from web1-test/DISK
   vdrepl failover stop-test web1`,
		Subcommands: []*cli.Command{
			{
				Name:      "test",
				Usage:     "expose a writable, throw-away copy of a recovery point as VM-test/DISK; replication goes on",
				ArgsUsage: "VM",
				Description: `Example:
   vdrepl failover test web1 --point 1234
   qemu-system-x86_64 ... -drive file=nbd+unix:///web1-test/root?socket=/var/lib/vdrepl/nbd.sock,format=raw
   vdrepl failover stop-test web1`,
				Flags:  []cli.Flag{pointFlag, jsonFlag},
				Action: run("test", "test failover"),
			},
			{
				Name:        "stop-test",
				Usage:       "end a test failover; what was written to the test copy is discarded",
				ArgsUsage:   "VM",
				Description: "Example:\n   vdrepl failover stop-test web1",
				Flags:       []cli.Flag{jsonFlag},
				Action:      run("stop-test", "test failover stopped, its writes discarded"),
			},
			{
				Name:      "unplanned",
				Usage:     "the primary is lost: roll the VM's disks to a recovery point and serve them read-write here",
				ArgsUsage: "VM",
				Description: `Example:
   vdrepl failover unplanned web1                 # the latest state
   vdrepl failover unplanned web1 --point 1234    # an older point
Until ` + "`vdrepl failover complete web1`" + ` every other point is kept and
` + "`vdrepl failover cancel web1`" + ` returns to being a replica at the latest state.`,
				Flags:  []cli.Flag{pointFlag, jsonFlag},
				Action: run("unplanned", "unplanned failover"),
			},
			{
				Name:      "planned",
				Usage:     "on the primary: hand a VM over to its replica with no data lost, and take replication back",
				ArgsUsage: "VM",
				Description: `Example (the VM shut down; both hosts run the replica role and allow each other):
   vdrepl failover planned web1
The last cycle is shipped, the replica becomes the primary and serves the
disks read-write, and replicates back to this host, which keeps the images
as its replica (only checksums travel: the images are equal). Run the same
command on the new primary to fail back.`,
				Flags: []cli.Flag{
					&cli.BoolFlag{Name: "force", Usage: "do it although clients have the VM open: its disks become read-only under them"},
					&cli.StringFlag{Name: "reverse-to", Usage: "HOST:PORT where the new primary reaches this host's replica role (default: its --replica-listen address)"},
					jsonFlag,
				},
				Action: func(c *cli.Context) error {
					vm, err := oneVM(c, "failover planned")
					if err != nil {
						return err
					}
					ctx, stop := signalContext(c)
					defer stop()
					res, err := client(c).FailoverPlanned(ctx, vm, c.Bool("force"), c.String("reverse-to"))
					if err != nil {
						return err
					}
					if c.Bool("json") {
						return printJSON(c.App.Writer, res)
					}
					fmt.Fprintf(c.App.Writer, "%s handed over to %s at cycle %d; it is the primary now\n", vm, res.To, res.Cycle)
					if res.Reversed {
						fmt.Fprintf(c.App.Writer, "replication reversed: this host is its replica\n")
					} else {
						fmt.Fprintf(c.App.Writer, "%s has not replicated back yet; see `vdrepl replication status` there\n", res.To)
					}
					return nil
				},
			},
			{
				Name:        "complete",
				Usage:       "make a failover final: the other recovery points are discarded",
				ArgsUsage:   "VM",
				Description: "Example:\n   vdrepl failover complete web1",
				Flags:       []cli.Flag{jsonFlag},
				Action:      run("complete", "failover completed; the VM is this host's now"),
			},
			{
				Name:        "cancel",
				Usage:       "undo a failover not yet completed: back to a replica at the latest state, writes since discarded",
				ArgsUsage:   "VM",
				Description: "Example (shut the failed-over VM down first):\n   vdrepl failover cancel web1",
				Flags:       []cli.Flag{jsonFlag},
				Action:      run("cancel", "failover cancelled; a replica again at the latest state"),
			},
		},
	}
}
