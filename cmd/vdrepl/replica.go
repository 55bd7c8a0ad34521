package main

import (
	"errors"
	"fmt"
	"path/filepath"
	"text/tabwriter"

	"github.com/urfave/cli/v2"

	"github.com/vdrepl/vdrepl/apply"
)

func replicaCmd() *cli.Command {
	return &cli.Command{
		Name:  "replica",
		Usage: "configure this host as a replica server (the Set-VMReplicationServer of vdrepl)",
		Description: `Example (the daemon runs with --replica-listen and its TLS flags):
   vdrepl replica allow add --primary host1.example.com --storage /srv/replicas/host1`,
		Subcommands: []*cli.Command{replicaAllowCmd(), replicaRemoveCmd()},
	}
}

func replicaRemoveCmd() *cli.Command {
	return &cli.Command{
		Name:      "remove",
		Usage:     "forget a replica VM kept on this host (its images stay unless --delete-images)",
		ArgsUsage: "VM",
		Description: `Example (on the replica host, after ` + "`vdrepl replication disable web1`" + ` on the primary):
   vdrepl replica remove web1
   vdrepl replica remove web1 --delete-images

The VM's replica bookkeeping, recovery points and block tree are removed;
its images stay in its replica directory unless --delete-images. The
images of a VM adopted as a replica (outside any replica directory) are
never deleted. A VM failed over on this host (` + "`vdrepl failover complete|cancel VM`" + `)
or in a test failover (` + "`vdrepl failover stop-test VM`" + `) is refused. If
its primary still replicates it, the primary's next request finds an
unknown VM and its replication stops with that error.`,
		Flags: []cli.Flag{
			&cli.BoolFlag{Name: "delete-images", Usage: "delete the VM's images too"},
			&cli.BoolFlag{Name: "json", Usage: "print JSON"},
		},
		Action: vmAction("replica remove", replicaHost, replicaRemoveAction),
	}
}

func replicaRemoveAction(c *cli.Context) error {
	vm, err := oneVM(c, "replica remove")
	if err != nil {
		return err
	}
	out, err := client(c).RemoveReplica(c.Context, vm, c.Bool("delete-images"))
	if err != nil {
		return err
	}
	if c.Bool("json") {
		if out.Images == nil {
			out.Images = []string{}
		}
		return printJSON(c.App.Writer, out)
	}
	if out.ImagesDeleted {
		fmt.Fprintf(c.App.Writer, "replica VM %s removed and its images were deleted\n", vm)
		return nil
	}
	fmt.Fprintf(c.App.Writer, "replica VM %s removed; its images stay in %s\n", vm, out.Dir)
	return nil
}

func replicaAllowCmd() *cli.Command {
	return &cli.Command{
		Name:  "allow",
		Usage: "which primaries may replicate here, and where their replicas are stored",
		Description: `Example:
   vdrepl replica allow add --primary host1.example.com --storage /srv/replicas/host1
   vdrepl replica allow list`,
		Subcommands: []*cli.Command{replicaAllowAddCmd(), replicaAllowListCmd(), replicaAllowRemoveCmd()},
	}
}

func replicaAllowAddCmd() *cli.Command {
	return &cli.Command{
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
		Action: replicaAllowAddAction,
	}
}

func replicaAllowAddAction(c *cli.Context) error {
	if c.NArg() != 0 {
		return errors.New("replica allow add takes only flags")
	}
	storage, err := filepath.Abs(c.String("storage"))
	if err != nil {
		return err
	}
	e := apply.AllowEntry{Primary: c.String("primary"), Storage: storage, TrustGroup: c.String("trust-group")}
	if err := client(c).Allow(c.Context, e); err != nil {
		return err
	}
	fmt.Fprintf(c.App.Writer, "primary %s may replicate to this host, into %s", e.Primary, e.Storage)
	if e.TrustGroup != "" {
		fmt.Fprintf(c.App.Writer, " (trust group %s)", e.TrustGroup)
	}
	fmt.Fprintln(c.App.Writer)
	return nil
}

func replicaAllowListCmd() *cli.Command {
	return &cli.Command{
		Name:  "list",
		Usage: "list the allow-list",
		Flags: []cli.Flag{&cli.BoolFlag{Name: "json", Usage: "print JSON"}},
		Description: `Example:
   vdrepl replica allow list --json`,
		Action: replicaAllowListAction,
	}
}

func replicaAllowListAction(c *cli.Context) error {
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
}

func replicaAllowRemoveCmd() *cli.Command {
	return &cli.Command{
		Name:        "remove",
		Usage:       "remove a primary from the allow-list",
		Description: "Example:\n   vdrepl replica allow remove --primary host1.example.com",
		Flags:       []cli.Flag{&cli.StringFlag{Name: "primary", Required: true, Usage: "the pattern as listed"}},
		Action:      replicaAllowRemoveAction,
	}
}

func replicaAllowRemoveAction(c *cli.Context) error {
	if err := client(c).Disallow(c.Context, c.String("primary")); err != nil {
		return err
	}
	fmt.Fprintf(c.App.Writer, "primary %s removed from the allow-list\n", c.String("primary"))
	return nil
}
