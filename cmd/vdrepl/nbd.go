package main

import (
	"errors"
	"fmt"
	"text/tabwriter"

	"github.com/urfave/cli/v2"

	"github.com/vdrepl/vdrepl/control"
)

func nbdCmd() *cli.Command {
	return &cli.Command{
		Name:  "nbd",
		Usage: "who may open which exports over NBD TLS",
		Description: `Example (the daemon serves --nbd tcp:HOST:PORT with its TLS flags):
   vdrepl nbd allow add --client kvm2.example.com --export web1

The unix socket is not subject to this list: its file mode and group
(serve --nbd-group) decide who may use it.`,
		Subcommands: []*cli.Command{nbdAllowCmd()},
	}
}

func nbdAllowCmd() *cli.Command {
	return &cli.Command{
		Name:  "allow",
		Usage: "which NBD clients (by certificate name) may open which exports over TLS",
		Description: `Example:
   vdrepl nbd allow add --client kvm2.example.com --export 'web1/*'
   vdrepl nbd allow list`,
		Subcommands: []*cli.Command{nbdAllowAddCmd(), nbdAllowListCmd(), nbdAllowRemoveCmd()},
	}
}

func nbdAllowAddCmd() *cli.Command {
	return &cli.Command{
		Name:  "add",
		Usage: "let an NBD client (by certificate name) open exports over TLS",
		Description: `Example:
   vdrepl nbd allow add --client kvm2.example.com --export web1
   vdrepl nbd allow add --client backup1 --export '*' --read-only
   vdrepl nbd allow add --client kvm2.example.com --export web1-test

--client is matched against the client certificate's name (CN or DNS SAN):
an exact name, *.domain for any name under domain, or * for any client
whose certificate chains to the daemon's --tls-ca. Issue client
certificates with "vdrepl pki issue --client NAME".

--export is VM/DISK, where * matches any characters but '/' (web1/*,
*/data); a VM name alone means all its disks, * alone every export. A test
failover's exports are VM-test/DISK. With --read-only the exports are served
read-only; if several entries match, one without --read-only wins.

Exports a client may not open are not listed to it, and opening one is
refused as if it did not exist. The change applies to the next connection;
no restart.`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "client", Required: true, Usage: "certificate name pattern: name, *.domain or *"},
			&cli.StringFlag{Name: "export", Required: true, Usage: "export pattern: VM/DISK, VM, web1/*, or *"},
			&cli.BoolFlag{Name: "read-only", Usage: "serve the exports read-only to this client"},
		},
		Action: nbdAllowAddAction,
	}
}

func nbdAllowAddAction(c *cli.Context) error {
	if c.NArg() != 0 {
		return errors.New("nbd allow add takes only flags")
	}
	e := control.NBDAllowEntry{Client: c.String("client"), Export: c.String("export"), ReadOnly: c.Bool("read-only")}
	if err := client(c).NBDAllow(c.Context, e); err != nil {
		return err
	}
	mode := "read-write"
	if e.ReadOnly {
		mode = "read-only"
	}
	fmt.Fprintf(c.App.Writer, "NBD client %s may open %s (%s) over TLS\n", e.Client, e.Export, mode)
	return nil
}

func nbdAllowListCmd() *cli.Command {
	return &cli.Command{
		Name:  "list",
		Usage: "list the NBD allow-list",
		Flags: []cli.Flag{&cli.BoolFlag{Name: "json", Usage: "print JSON"}},
		Description: `Example:
   vdrepl nbd allow list --json`,
		Action: nbdAllowListAction,
	}
}

func nbdAllowListAction(c *cli.Context) error {
	l, err := client(c).NBDAllowList(c.Context)
	if err != nil {
		return err
	}
	if c.Bool("json") {
		if l == nil {
			l = []control.NBDAllowEntry{}
		}
		return printJSON(c.App.Writer, l)
	}
	tw := tabwriter.NewWriter(c.App.Writer, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "CLIENT\tEXPORT\tACCESS")
	for _, e := range l {
		mode := "read-write"
		if e.ReadOnly {
			mode = "read-only"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\n", e.Client, e.Export, mode)
	}
	return tw.Flush()
}

func nbdAllowRemoveCmd() *cli.Command {
	return &cli.Command{
		Name:  "remove",
		Usage: "remove an NBD allow-list entry; its client's connections that it allowed end",
		Description: `Example:
   vdrepl nbd allow remove --client kvm2.example.com --export web1`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "client", Required: true, Usage: "the client pattern as listed"},
			&cli.StringFlag{Name: "export", Required: true, Usage: "the export pattern as listed"},
		},
		Action: nbdAllowRemoveAction,
	}
}

func nbdAllowRemoveAction(c *cli.Context) error {
	if err := client(c).NBDDisallow(c.Context, c.String("client"), c.String("export")); err != nil {
		return err
	}
	fmt.Fprintf(c.App.Writer, "NBD client %s may no longer open %s\n", c.String("client"), c.String("export"))
	return nil
}
