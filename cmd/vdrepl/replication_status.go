package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/urfave/cli/v2"
	"golang.org/x/sys/unix"

	"github.com/vdrepl/vdrepl/apply"
	"github.com/vdrepl/vdrepl/control"
	"github.com/vdrepl/vdrepl/internal/units"
)

func replicationStatusCmd() *cli.Command {
	return &cli.Command{
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
		Action: replicationStatusAction,
	}
}

func replicationStatusAction(c *cli.Context) error {
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
	s := fmt.Sprintf("[%s] %3.0f%% %s / %s", bar, 100*float64(done)/float64(total), units.FormatBytes(done), units.FormatBytes(total))
	if rate > 0 {
		s += fmt.Sprintf("  %s/s", units.FormatBytes(int64(rate)))
	}
	if eta > 0 {
		s += "  ETA " + eta.Round(time.Second).String()
	}
	return s
}

// printReplication renders replication status for people.
func printReplication(c *cli.Context, r control.Replication, tty bool) {
	w := c.App.Writer
	now := time.Now()
	for _, p := range r.Primaries {
		printPrimary(w, p, now, tty)
	}
	for _, rep := range r.Replicas {
		printReplica(w, rep, now)
	}
	if len(r.Primaries)+len(r.Replicas) == 0 {
		fmt.Fprintln(w, "no VM is replicated from or to this host")
	}
	for _, warn := range r.Warnings {
		fmt.Fprintf(w, "warning: %s\n", warn)
	}
}

// printPrimary renders one VM this host replicates to a replica.
func printPrimary(w io.Writer, p control.ReplicationStatus, now time.Time, tty bool) {
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
		fmt.Fprintf(w, "  lag:          current RPO %s, target %s\n", time.Duration(m.LagSeconds*float64(time.Second)).Round(time.Second), time.Duration(p.Spec.Frequency))
	}
	if s.Committing > 0 {
		fmt.Fprintf(w, "  applying:     cycle %d (uploaded; the replica is applying it)\n", s.Committing)
	}
	fmt.Fprintf(w, "  pending:      %s in %d cycle(s), journal cap %s\n", units.FormatBytes(m.PendingBytes), m.PendingCycles, units.FormatBytes(m.JournalCapBytes))
	fmt.Fprintf(w, "  cycles:       %d shipped, %d missed; size avg %s, max %s; latency avg %s\n",
		m.CyclesShippedTotal, m.CyclesMissedTotal, units.FormatBytes(int64(m.AvgCycleWireBytes)), units.FormatBytes(m.MaxCycleWireBytes),
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
			fmt.Fprintf(w, ", %s of %s", units.FormatBytes(m.SyncDoneBytes), units.FormatBytes(m.SyncTotalBytes))
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
	if d := s.Diverged; d != nil {
		fmt.Fprintf(w, "  DIVERGED:     the replica's disks %s differed from ours after cycle %d (block-tree roots, %s); a resync repairs them\n",
			strings.Join(d.Disks, ", "), d.Cycle, d.At.Local().Format(timeZone))
	}
	switch {
	case s.Verified > 0:
		fmt.Fprintf(w, "  verified at:  cycle %d (the replica's block-tree roots equal ours at its barrier)", s.Verified)
		if m.UnverifiedCyclesTotal > 0 {
			fmt.Fprintf(w, "; %d cycles shipped unverified", m.UnverifiedCyclesTotal)
		}
		fmt.Fprintln(w)
	case m.UnverifiedCyclesTotal > 0:
		fmt.Fprintf(w, "  verified at:  none yet; %d cycles shipped unverified (the block tree is being built)\n", m.UnverifiedCyclesTotal)
	}
	if p.Spec.VerifyEvery > 0 {
		fmt.Fprintf(w, "  verify:       scheduled every %s\n", time.Duration(p.Spec.VerifyEvery))
	}
	printLastVerify(w, s, now)
}

// printReplica renders one VM this host keeps the replica of.
func printReplica(w io.Writer, rep control.ReplicaStatus, now time.Time) {
	fmt.Fprintf(w, "VM %s <- %s (replica)\n", rep.VM, rep.Primary)
	if f := rep.FailedOver; f != nil {
		fmt.Fprintf(w, "  state:        failed over (%s) to %s at %s; takes no data from %s\n", f.Kind, apply.PointName(f.Point), f.At.Local().Format(timeZone), rep.Primary)
	} else {
		fmt.Fprintf(w, "  state:        %s, consistent: %v\n", rep.State, rep.Consistent)
	}
	if line := replicaHealthLine(rep, now); line != "" {
		fmt.Fprintf(w, "  health:       %s\n", line)
	}
	if d := rep.Diverged; d != nil {
		fmt.Fprintf(w, "  DIVERGED:     after cycle %d (%s) disks %s differ from the primary's (block-tree roots); the primary resyncs them\n",
			d.Cycle, d.At.Local().Format(timeZone), strings.Join(d.Disks, ", "))
	}
	if rep.Verified > 0 {
		fmt.Fprintf(w, "  verified:     cycle %d: the replica's block-tree roots equal the primary's at its barrier\n", rep.Verified)
	}
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
		fmt.Fprintf(w, "  points:       %d of %d kept, %s of undo data\n", rep.Points, rep.RecoveryPoints, units.FormatBytes(rep.PointBytes))
	}
	if len(rep.Excluded) > 0 {
		fmt.Fprintf(w, "  not replicated (excluded on the primary): %s\n", strings.Join(rep.Excluded, ", "))
	}
	if tf := rep.TestFailover; tf != nil {
		fmt.Fprintf(w, "  test failover: %s since %s, exports %s\n", testPointName(*tf), tf.Started.Local().Format(timeZone), strings.Join(tf.Exports, ", "))
	}
}

// timeZone is how the replica's lines show a time: with its zone.
const timeZone = "2006-01-02 15:04:05 MST"

// replicaHealthLine says whether the replica VM's cycles keep arriving;
// "" from a daemon that does not judge it.
func replicaHealthLine(rep control.ReplicaStatus, now time.Time) string {
	switch {
	case rep.Health == "":
		return ""
	case rep.Health != apply.HealthNormal:
		return rep.Health + ": " + rep.HealthReason
	case rep.FailedOver != nil || rep.LastCycleAt.IsZero():
		return rep.Health
	}
	line := fmt.Sprintf("%s (last cycle applied %s ago", rep.Health, now.Sub(rep.LastCycleAt).Round(time.Second))
	if rep.FrequencySeconds > 0 {
		line += fmt.Sprintf(", frequency %s", time.Duration(rep.FrequencySeconds*float64(time.Second)))
	}
	return line + ")"
}
