package main

import (
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/vdrepl/vdrepl/control"
	"github.com/vdrepl/vdrepl/internal/units"
	"github.com/vdrepl/vdrepl/ship"
)

// Exit statuses of `vdrepl verify`.
const (
	verifyClean    = 0
	verifyMismatch = 1
	verifyFailed   = 2
)

func verifyCmd() *cli.Command {
	return &cli.Command{
		Name:      "verify",
		Usage:     "compare a replicated VM's disks with its replica, block by block, and repair what differs",
		ArgsUsage: "VM",
		Description: `Example:
   vdrepl verify web1 --dry-run
   vdrepl verify web1 --rate 50MB/s --json
   vdrepl verify web1 --point 1042        # on the replica host

Run on the primary host while the VM runs and replicates: an online scrub.
For each disk, range by range, the replica hashes its blocks (BLAKE3) at the
cycle it has applied and this host hashes the same blocks of the live image
at --rate. Blocks the guest wrote after that cycle are skipped, not reported;
so is a range whose cycle the journal no longer holds ("replica behind by
more than the journal holds"). Progress goes to stderr unless --json, and to
` + "`vdrepl replication status VM`" + ` while it runs.

Which side is right: the block trees say. Where the primary's image no
longer hashes to what its tree recorded when the data was written and the
replica's tree holds that hash, this host's image was damaged at rest: the
blocks are reported as DAMAGED, the replica is the truth, and no resync is
started (it would copy the damage over the good copy). Otherwise the
primary is the truth: without --dry-run, blocks that differ start a resync
at once (as
` + "`vdrepl replication resync VM`" + ` does, not at the resync window), naming
the disk and byte ranges; that resync reads and compares both sides' images
(not their block trees, which may both still describe the good data), and
sends the primary's blocks that differ. With --dry-run it only reports.

With --point ID, run on the replica host: the recovery point is read back
as a failover to it would read it (images plus undo data), hashed into
block-tree roots and compared with the roots the replica's tree had when
the point was taken. Damage at rest in the undo data fails the read with
the record named; damage in an image block the point shares with the
latest state shows as roots that differ. Exit status 1 when they differ.

The last result shows in ` + "`vdrepl replication status VM`" + ` and in the
metrics vdrepl_verify_last_timestamp_seconds and
vdrepl_verify_last_mismatch_blocks.

Ranges not compared are listed with why, and "N bytes not compared: REASON"
follows them. A verify that compared nothing at all (every range skipped:
the journal only tracks dirty blocks, the replica holds a resync or is not
at one cycle) is a failure, not a clean result.

Exit status:
   0  the replica matched the primary where compared
   1  blocks differ (a resync was started, or --dry-run)
   2  an error: bad usage or config, the daemon refused or failed, or
      nothing was compared`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "rate", Value: ship.DefaultVerifyRate, Usage: "bound on how fast this host reads its images (e.g. 50MB/s, 1GB/s, unlimited)"},
			&cli.BoolFlag{Name: "dry-run", Usage: "only report; do not start a resync"},
			&cli.BoolFlag{Name: "json", Usage: "print the result as JSON, without progress lines"},
			&cli.StringFlag{Name: "point", Usage: "on the replica host: check this recovery point (an ID as listed by replication points) against the roots recorded when it was taken"},
		},
		Action: verifyAction,
	}
}

func verifyAction(c *cli.Context) error {
	vm, err := oneVM(c, "verify")
	if err != nil {
		return cli.Exit("vdrepl: "+err.Error(), verifyFailed)
	}
	jsonOut := c.Bool("json")
	if c.IsSet("point") {
		return verifyPointAction(c, vm, c.String("point"), jsonOut)
	}
	errw := c.App.ErrWriter
	var progress func(ship.VerifyProgress)
	if !jsonOut {
		progress = func(p ship.VerifyProgress) { printVerifyProgress(errw, vm, p) }
	}
	res, err := client(c).Verify(c.Context, vm, control.VerifyRequest{Rate: c.String("rate"), DryRun: c.Bool("dry-run")}, progress)
	if err != nil {
		return cli.Exit("vdrepl: verify "+vm+": "+err.Error(), verifyFailed)
	}
	if jsonOut {
		err = printJSON(c.App.Writer, res)
	} else {
		printVerifyResult(c.App.Writer, res)
	}
	if err != nil {
		return cli.Exit("vdrepl: "+err.Error(), verifyFailed)
	}
	return verifyOutcome(vm, res)
}

// verifyUsageError makes a usage error of verify exit status 2: 1 is its
// "blocks differ", which a script must not read from a mistyped flag.
func verifyUsageError(f cli.OnUsageErrorFunc) cli.OnUsageErrorFunc {
	return func(c *cli.Context, err error, sub bool) error {
		return cli.Exit("vdrepl: "+f(c, err, sub).Error(), verifyFailed)
	}
}

// verifyOutcome is the exit status of a verify that returned res.
func verifyOutcome(vm string, res ship.VerifyResult) error {
	if res.NothingCompared {
		return cli.Exit("vdrepl: verify "+vm+": nothing compared: "+res.NotCompared, verifyFailed)
	}
	if res.MismatchBlocks > 0 {
		return cli.Exit("", verifyMismatch)
	}
	return nil
}

func printVerifyProgress(w io.Writer, vm string, p ship.VerifyProgress) {
	if w == nil || p.Total <= 0 {
		return
	}
	fmt.Fprintf(w, "verify %s: %3.0f%% (%s of %s), %s/s, ETA %s\n", vm, 100*float64(p.Done)/float64(p.Total),
		units.FormatBytes(p.Done), units.FormatBytes(p.Total), units.FormatBytes(int64(p.Rate)), time.Duration(p.ETASeconds*float64(time.Second)).Round(time.Second))
}

func printVerifyResult(w io.Writer, r ship.VerifyResult) {
	fmt.Fprintf(w, "verify of %s: %s compared in %s (%s/s over %s)\n", r.VM, units.FormatBytes(r.CheckedBytes),
		time.Duration(r.DurationSeconds*float64(time.Second)).Round(time.Millisecond), units.FormatBytes(int64(r.Rate)), units.FormatBytes(r.TotalBytes))
	if r.ChangedBlocks > 0 {
		fmt.Fprintf(w, "  skipped:    %d blocks (4 KiB) written on the primary after the replica's cycle\n", r.ChangedBlocks)
	}
	for _, s := range r.Skipped {
		fmt.Fprintf(w, "  skipped:    disk %s [%d,%d): %s\n", s.Disk, s.From, s.To, s.Why)
	}
	if r.SkippedBytes > 0 {
		fmt.Fprintf(w, "  skipped:    %d bytes not compared: %s\n", r.SkippedBytes, r.SkipReason)
	}
	for _, m := range r.Mismatches {
		var rs []string
		for _, x := range m.Ranges {
			rs = append(rs, fmt.Sprintf("[%d,%d)", x.From, x.To))
		}
		if m.MoreRanges > 0 {
			rs = append(rs, fmt.Sprintf("and %d more ranges", m.MoreRanges))
		}
		fmt.Fprintf(w, "  MISMATCH:   disk %s differs from the replica in %d blocks (4 KiB): %s\n", m.Disk, m.Blocks, strings.Join(rs, " "))
	}
	for _, m := range r.PrimaryDamaged {
		var rs []string
		for _, x := range m.Ranges {
			rs = append(rs, fmt.Sprintf("[%d,%d)", x.From, x.To))
		}
		if m.MoreRanges > 0 {
			rs = append(rs, fmt.Sprintf("and %d more ranges", m.MoreRanges))
		}
		fmt.Fprintf(w, "  DAMAGED:    disk %s on THIS host: %d blocks (4 KiB) no longer hash to what was written: %s\n", m.Disk, m.Blocks, strings.Join(rs, " "))
	}
	switch {
	case r.NothingCompared:
		fmt.Fprintf(w, "  result:     nothing compared: %s\n", r.NotCompared)
	case r.PrimaryDamagedBlocks > 0:
		fmt.Fprintln(w, "  repair:     none: a resync would copy the damaged blocks over the replica's good ones")
	case r.MismatchBlocks == 0 && r.SkippedBytes > 0:
		fmt.Fprintf(w, "  result:     the replica matches the primary in the %d bytes compared\n", r.CheckedBytes)
	case r.MismatchBlocks == 0:
		fmt.Fprintln(w, "  result:     the replica matches the primary")
	case r.ResyncMarked:
		fmt.Fprintf(w, "  repair:     resync started to repair it; follow it with `vdrepl replication status %s`\n", r.VM)
	default:
		fmt.Fprintln(w, "  repair:     none (--dry-run)")
	}
	if r.MismatchBlocks > 0 {
		fmt.Fprintf(w, "  truth:      %s\n", r.Truth)
	}
}

// printLastVerify is the verify lines of `vdrepl replication status VM`.
func printLastVerify(w io.Writer, s ship.Status, now time.Time) {
	if p := s.Verify; p != nil && p.Total > 0 {
		fmt.Fprintf(w, "  verifying:    %.0f%% (%s of %s), ETA %s\n", 100*float64(p.Done)/float64(p.Total), units.FormatBytes(p.Done), units.FormatBytes(p.Total),
			time.Duration(p.ETASeconds*float64(time.Second)).Round(time.Second))
	}
	if l := s.LastVerify; l != nil {
		what := ""
		switch {
		case l.MismatchBlocks > 0 && l.ResyncMarked:
			what = ", resync started"
		case l.MismatchBlocks > 0:
			what = ", not repaired (dry run)"
		}
		fmt.Fprintf(w, "  last verified: %s (%s ago), %d bytes, %d mismatches%s\n", l.At.Local().Format(time.DateTime),
			now.Sub(l.At).Round(time.Second), l.CheckedBytes, l.MismatchBlocks, what)
	}
}

// verifyPointAction is `vdrepl verify VM --point ID` on a replica host.
func verifyPointAction(c *cli.Context, vm, id string, jsonOut bool) error {
	res, err := client(c).VerifyPoint(c.Context, vm, id)
	if err != nil {
		return cli.Exit("vdrepl: verify "+vm+" --point "+id+": "+err.Error(), verifyFailed)
	}
	if jsonOut {
		if err := printJSON(c.App.Writer, res); err != nil {
			return cli.Exit("vdrepl: "+err.Error(), verifyFailed)
		}
	} else {
		w := c.App.Writer
		fmt.Fprintf(w, "verify of recovery point %s of %s: %s read in %s\n", res.Point, res.VM, units.FormatBytes(res.CheckedBytes),
			time.Duration(res.DurationSeconds*float64(time.Second)).Round(time.Millisecond))
		for _, d := range res.Disks {
			if d.Match {
				fmt.Fprintf(w, "  disk %s: matches the roots recorded when the point was taken\n", d.Disk)
			} else {
				fmt.Fprintf(w, "  disk %s: DIFFERS: root %s, recorded %s\n", d.Disk, d.Root, d.Recorded)
			}
		}
	}
	if !res.Match {
		return cli.Exit("", verifyMismatch)
	}
	return nil
}
