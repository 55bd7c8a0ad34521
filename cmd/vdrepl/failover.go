package main

import (
	"fmt"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/vdrepl/vdrepl/apply"
)

func failoverCmd() *cli.Command {
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
			failoverTestCmd(),
			failoverStopTestCmd(),
			failoverUnplannedCmd(),
			failoverPlannedCmd(),
			failoverCompleteCmd(),
			failoverCancelCmd(),
		},
	}
}

func failoverPointFlag() cli.Flag {
	return &cli.StringFlag{Name: "point", Usage: "recovery point ID, as \"vdrepl replication points VM\" lists them (default: the latest state)"}
}

func failoverJSONFlag() cli.Flag { return &cli.BoolFlag{Name: "json", Usage: "print JSON"} }

// failoverAction runs the failover operation op on the replica host and
// says what it did (what: its name in the output).
func failoverAction(op, what string) cli.ActionFunc {
	return vmAction("failover "+op, replicaHost, func(c *cli.Context) error {
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
	})
}

func failoverTestCmd() *cli.Command {
	return &cli.Command{
		Name:      "test",
		Usage:     "expose a writable, throw-away copy of a recovery point as VM-test/DISK; replication goes on",
		ArgsUsage: "VM",
		Description: `Example:
   vdrepl failover test web1 --point 1234
   qemu-system-x86_64 ... -drive file=nbd+unix:///web1-test/root?socket=/var/lib/vdrepl/nbd.sock,format=raw
   vdrepl failover stop-test web1`,
		Flags:  []cli.Flag{failoverPointFlag(), failoverJSONFlag()},
		Action: failoverAction("test", "test failover"),
	}
}

func failoverStopTestCmd() *cli.Command {
	return &cli.Command{
		Name:        "stop-test",
		Usage:       "end a test failover; what was written to the test copy is discarded",
		ArgsUsage:   "VM",
		Description: "Example:\n   vdrepl failover stop-test web1",
		Flags:       []cli.Flag{failoverJSONFlag()},
		Action:      failoverAction("stop-test", "test failover stopped, its writes discarded"),
	}
}

func failoverUnplannedCmd() *cli.Command {
	return &cli.Command{
		Name:      "unplanned",
		Usage:     "the primary is lost: roll the VM's disks to a recovery point and serve them read-write here",
		ArgsUsage: "VM",
		Description: `Example:
   vdrepl failover unplanned web1                 # the latest state
   vdrepl failover unplanned web1 --point 1234    # an older point
Until ` + "`vdrepl failover complete web1`" + ` every other point is kept and
` + "`vdrepl failover cancel web1`" + ` returns to being a replica at the latest state.`,
		Flags:  []cli.Flag{failoverPointFlag(), failoverJSONFlag()},
		Action: failoverAction("unplanned", "unplanned failover"),
	}
}

func failoverPlannedCmd() *cli.Command {
	return &cli.Command{
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
			failoverJSONFlag(),
		},
		// On a replica host the daemon's error already names the primary.
		Action: vmAction("failover planned", eitherHost, failoverPlannedAction),
	}
}

func failoverPlannedAction(c *cli.Context) error {
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
}

func failoverCompleteCmd() *cli.Command {
	return &cli.Command{
		Name:        "complete",
		Usage:       "make a failover final: the other recovery points are discarded",
		ArgsUsage:   "VM",
		Description: "Example:\n   vdrepl failover complete web1",
		Flags:       []cli.Flag{failoverJSONFlag()},
		Action:      failoverAction("complete", "failover completed; the VM is this host's now"),
	}
}

func failoverCancelCmd() *cli.Command {
	return &cli.Command{
		Name:        "cancel",
		Usage:       "undo a failover not yet completed: back to a replica at the latest state, writes since discarded",
		ArgsUsage:   "VM",
		Description: "Example (shut the failed-over VM down first):\n   vdrepl failover cancel web1",
		Flags:       []cli.Flag{failoverJSONFlag()},
		Action:      failoverAction("cancel", "failover cancelled; a replica again at the latest state"),
	}
}
