package main

import (
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"text/tabwriter"

	"github.com/urfave/cli/v2"

	"github.com/vdrepl/vdrepl/control"
	"github.com/vdrepl/vdrepl/daemon"
	"github.com/vdrepl/vdrepl/internal/units"
)

func vmCmd() *cli.Command {
	return &cli.Command{
		Name:  "vm",
		Usage: "register, list and remove VMs",
		Description: `Example:
   vdrepl vm add web1 --disk /srv/vm/web1.img:20G
   vdrepl vm list`,
		Subcommands: []*cli.Command{vmAddCmd(), vmListCmd(), vmRemoveCmd(), vmSealCmd(), vmUnfenceCmd()},
	}
}

func vmAddCmd() *cli.Command {
	return &cli.Command{
		Name:      "add",
		Usage:     "register a VM and export its disks as NBD exports VM/DISK",
		ArgsUsage: "NAME",
		Description: `Example:
   vdrepl vm add web1 --disk /srv/vm/web1-root.img:20G --disk data=/srv/vm/web1-data.img

--disk [NAME=]PATH[:SIZE]: with SIZE (K, M, G, T) a missing image is created
sparse; an existing image must have that size. DISK is NAME, or the file
name without extension.`,
		Flags: []cli.Flag{
			&cli.StringSliceFlag{Name: "disk", Required: true, Usage: "[NAME=]PATH[:SIZE] (repeatable)"},
			&cli.BoolFlag{Name: "json", Usage: "print the registered VM as JSON"},
		},
		Action: vmAddAction,
	}
}

func vmAddAction(c *cli.Context) error {
	if c.NArg() != 1 {
		return fmt.Errorf("vm add takes exactly one VM name, got %d arguments", c.NArg())
	}
	spec := control.VMSpec{Name: c.Args().First()}
	for _, s := range c.StringSlice("disk") {
		ds, err := daemon.ParseDiskSpec(s)
		if err != nil {
			return err
		}
		if ds.Path, err = filepath.Abs(ds.Path); err != nil {
			return err
		}
		spec.Disks = append(spec.Disks, ds)
	}
	out, err := client(c).AddVM(c.Context, spec)
	if err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(c.App.Writer, out)
	}
	for _, d := range out.Disks {
		fmt.Fprintf(c.App.Writer, "%s/%s\t%s\t%d bytes\n", out.Name, d.Name, d.Path, d.Size)
	}
	return nil
}

func vmListCmd() *cli.Command {
	return &cli.Command{
		Name:  "list",
		Usage: "list registered VMs and their disks",
		Flags: []cli.Flag{&cli.BoolFlag{Name: "json", Usage: "print JSON"}},
		Description: `Example:
   vdrepl vm list
   vdrepl vm list --json

One line per disk: its NBD export VM/DISK, size, image and state (ok, not
served, resync required, or the error that stopped it). A test failover
running on this host adds one line per export VM-test/DISK.`,
		Action: vmListAction,
	}
}

func vmListAction(c *cli.Context) error {
	vms, err := client(c).VMs(c.Context)
	if err != nil {
		return err
	}
	if c.Bool("json") {
		if vms == nil {
			vms = []control.VMInfo{}
		}
		return printJSON(c.App.Writer, vms)
	}
	return printVMs(c.App.Writer, vms)
}

// printVMs renders vm list for people: a line per disk, and one per
// export of a test failover.
func printVMs(w io.Writer, vms []control.VMInfo) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "EXPORT\tSIZE\tIMAGE\tSTATE")
	for _, v := range vms {
		for i, d := range v.Disks {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", v.Exports[i], units.FormatBytes(d.Size), d.Path, vmState(v))
		}
		if tf := v.TestFailover; tf != nil {
			for _, e := range tf.Exports {
				fmt.Fprintf(tw, "%s\t-\t(throw-away overlay)\ttest failover of %s from %s\n", e, tf.VM, testPointName(*tf))
			}
		}
	}
	return tw.Flush()
}

// testPointName names the point a test failover runs from, with its cycle.
func testPointName(tf control.TestFailoverInfo) string {
	if tf.Point == "" {
		return fmt.Sprintf("the latest state (cycle %d)", tf.Cycle)
	}
	return fmt.Sprintf("point %s (cycle %d)", tf.Point, tf.Cycle)
}

func vmRemoveCmd() *cli.Command {
	return &cli.Command{
		Name:      "remove",
		Usage:     "stop serving a VM and forget it (its images stay)",
		ArgsUsage: "NAME",
		Description: `Example:
   vdrepl vm remove web1

Refused while a client has one of the VM's disks open or while the VM is
replicated (run vdrepl replication disable web1 first).`,
		Action: vmAction("vm remove", eitherHost, vmRemoveAction),
	}
}

func vmRemoveAction(c *cli.Context) error {
	if c.NArg() != 1 {
		return fmt.Errorf("vm remove takes exactly one VM name")
	}
	vm := c.Args().First()
	if err := client(c).RemoveVM(c.Context, vm); err != nil {
		return err
	}
	fmt.Fprintf(c.App.Writer, "%s removed; its images stay\n", vm)
	return nil
}

func vmSealCmd() *cli.Command {
	return &cli.Command{
		Name:      "seal",
		Usage:     "close the VM's current cycle now (all its disks at one instant)",
		ArgsUsage: "NAME",
		Flags:     []cli.Flag{&cli.BoolFlag{Name: "json", Usage: "print JSON"}},
		Description: `Example:
   vdrepl vm seal web1`,
		Action: vmAction("vm seal", eitherHost, vmSealAction),
	}
}

func vmSealAction(c *cli.Context) error {
	if c.NArg() != 1 {
		return fmt.Errorf("vm seal takes exactly one VM name")
	}
	info, err := client(c).Seal(c.Context, c.Args().First())
	if err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(c.App.Writer, info)
	}
	if info.Blocks == 0 && info.Bytes > 0 {
		fmt.Fprintf(c.App.Writer, "cycle %d sealed: %s written (not kept: replication is not enabled for this VM)\n", info.Cycle, units.FormatBytes(info.Bytes))
		return nil
	}
	fmt.Fprintf(c.App.Writer, "cycle %d sealed: %s written, %d distinct blocks to ship\n", info.Cycle, units.FormatBytes(info.Bytes), info.Blocks)
	return nil
}

func vmState(v control.VMInfo) string {
	switch {
	case v.Fenced != nil:
		return v.Fenced.Sentence() + " (read-only)"
	case v.Error != "":
		return "error: " + v.Error
	case v.Journal == nil:
		return "not served"
	case v.Journal.Failed != "":
		return "journal failed: " + v.Journal.Failed
	case v.Journal.ResyncRequired:
		return "resync required"
	case v.HandedOver != nil:
		return fmt.Sprintf("read-only: handed over to %s (planned failover)", v.HandedOver.To)
	case v.FailedOver:
		s := "failed over here (complete or cancel the failover)"
		if len(v.Lacks) > 0 {
			s += "; lacks disk(s) " + strings.Join(v.Lacks, ", ")
		}
		return s
	}
	if len(v.Lacks) > 0 {
		return "ok; lacks disk(s) " + strings.Join(v.Lacks, ", ") + " (not replicated)"
	}
	return "ok"
}

func vmUnfenceCmd() *cli.Command {
	return &cli.Command{
		Name:      "unfence",
		Usage:     "make a VM fenced after an unplanned failover writable here again (--force: risks a split brain)",
		ArgsUsage: "NAME",
		Flags:     []cli.Flag{&cli.BoolFlag{Name: "force", Usage: "unfence although the VM runs on its replica host: writes here are never replicated and are lost when replication is reversed"}},
		Description: `Example:
   vdrepl vm unfence web1 --force

A VM is fenced on its old primary when it was failed over (unplanned) on
its replica host while this host was away: this copy is stale, so its disks
are read-only here. The usual way out is to keep the VM where it runs now
and replicate it back: ` + "`vdrepl replication reverse web1 --replica THIS_HOST:PORT`" + `
on the replica host, which makes this host its replica. Unfencing instead
makes this stale copy writable while the other runs: two copies that
diverge (a split brain). Without --force it only says so.`,
		Action: vmAction("vm unfence", eitherHost, vmUnfenceAction),
	}
}

func vmUnfenceAction(c *cli.Context) error {
	if c.NArg() != 1 {
		return fmt.Errorf("vm unfence takes exactly one VM name")
	}
	vm := c.Args().First()
	if err := client(c).Unfence(c.Context, vm, c.Bool("force")); err != nil {
		return err
	}
	fmt.Fprintf(c.App.Writer, "%s unfenced: writable here again, while it runs on its replica host too; writes here are not replicated there\n", vm)
	return nil
}
