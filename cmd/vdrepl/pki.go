package main

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/vdrepl/vdrepl/internal/pki"
)

func pkiCmd() *cli.Command {
	return &cli.Command{
		Name:  "pki",
		Usage: "make the CA and host certificates hosts use for mutual TLS",
		Description: `Hosts authenticate each other with certificates from a private CA. Once:
   vdrepl pki init --dir /etc/vdrepl/pki
Then, per host, on the machine holding ca.key:
   vdrepl pki issue --dir /etc/vdrepl/pki --name replica1.example.com --san 10.0.0.7
and copy ca.crt, HOST.crt and HOST.key to that host.
An NBD client on another host (qemu, libnbd) gets a client certificate:
   vdrepl pki issue --dir /etc/vdrepl/pki --client kvm2.example.com
   vdrepl pki export --dir /etc/vdrepl/pki --client kvm2.example.com --qemu /tmp/kvm2-tls
and the directory is copied to that host.`,
		Subcommands: []*cli.Command{pkiInitCmd(), pkiIssueCmd(), pkiExportCmd(), pkiShowCmd()},
	}
}

func pkiInitCmd() *cli.Command {
	return &cli.Command{
		Name:  "init",
		Usage: "create a CA: DIR/ca.crt and DIR/ca.key",
		Description: `Example:
   vdrepl pki init --dir /etc/vdrepl/pki --name prod

The CA is named "vdrepl CA NAME" (default: this host's name) and is valid
for 10 years. init never replaces an existing CA.`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "dir", Required: true, Usage: "directory for the CA (made, mode 0700, if missing)"},
			&cli.StringFlag{Name: "name", Usage: "CA name (default: this host's name)"},
		},
		Action: pkiInitAction,
	}
}

func pkiInitAction(c *cli.Context) error {
	dir, err := filepath.Abs(c.String("dir"))
	if err != nil {
		return err
	}
	files, err := pki.Init(dir, pki.InitOptions{Name: c.String("name")})
	if err != nil {
		return err
	}
	w := c.App.Writer
	fmt.Fprintf(w, "wrote %s (CA certificate: every host needs it)\n", files.Cert)
	fmt.Fprintf(w, "wrote %s (CA key: keep it secret, on this machine only)\n", files.Key)
	fmt.Fprintf(w, "next: vdrepl pki issue --dir %s --name HOST\n", dir)
	return nil
}

func pkiIssueCmd() *cli.Command {
	return &cli.Command{
		Name:  "issue",
		Usage: "issue a host (--name) or NBD client (--client) certificate from the CA in DIR: DIR/NAME.crt and DIR/NAME.key",
		Description: `Example:
   vdrepl pki issue --dir /etc/vdrepl/pki --name replica1.example.com --san replica1 --san 10.0.0.7
   vdrepl pki issue --dir /etc/vdrepl/pki --client kvm2.example.com

A host certificate (--name) serves the host both as TLS server and as TLS
client. Its names are --name and every --san (host names or IP addresses);
a client must connect by one of them.

A client certificate (--client) is for TLS clients only: an NBD client
such as qemu on another host, which "vdrepl nbd allow add --client NAME"
then lets open exports. Lay it out for the client with "vdrepl pki export".

issue never replaces existing files: to renew, move NAME.crt and NAME.key
away first.`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "dir", Required: true, Usage: "directory holding ca.crt and ca.key"},
			&cli.StringFlag{Name: "name", Usage: "host name: the certificate's name and the files' names"},
			&cli.StringFlag{Name: "client", Usage: "NBD client name (instead of --name): a certificate for TLS clients only"},
			&cli.StringSliceFlag{Name: "san", Usage: "another host name or IP address of the host (repeatable)"},
			&cli.BoolFlag{Name: "rsa", Usage: "RSA 3072 key instead of ECDSA P-256"},
			&cli.IntFlag{Name: "days", Value: 825, Usage: "days of validity (at most until the CA expires)"},
		},
		Action: pkiIssueAction,
	}
}

func pkiIssueAction(c *cli.Context) error {
	dir, err := filepath.Abs(c.String("dir"))
	if err != nil {
		return err
	}
	days := c.Int("days")
	if days <= 0 {
		return fmt.Errorf("--days %d: want a positive number of days", days)
	}
	name, client := c.String("name"), c.String("client")
	switch {
	case name == "" && client == "":
		return fmt.Errorf("pki issue: give --name HOST for a host certificate or --client NAME for an NBD client's")
	case name != "" && client != "":
		return fmt.Errorf("pki issue: give --name or --client, not both")
	case client != "":
		name = client
	}
	opt := pki.IssueOptions{SANs: c.StringSlice("san"), RSA: c.Bool("rsa"), Validity: time.Duration(days) * 24 * time.Hour, Client: client != ""}
	files, err := pki.Issue(dir, name, opt)
	if err != nil {
		return err
	}
	w := c.App.Writer
	if client != "" {
		fmt.Fprintf(w, "wrote %s\nwrote %s (private key of NBD client %s)\n", files.Cert, files.Key, client)
		fmt.Fprintf(w, "next: vdrepl pki export --dir %s --client %s --qemu DIR (or --libnbd DIR), copy DIR to the client's host,\n", dir, client)
		fmt.Fprintf(w, "and on the NBD host: vdrepl nbd allow add --client %s --export VM/DISK\n", client)
		return nil
	}
	fmt.Fprintf(w, "wrote %s\nwrote %s (private key: copy it to that host only)\n", files.Cert, files.Key)
	fmt.Fprintf(w, "use them on that host, with %s:\n   vdrepl serve --tls-cert %s --tls-key %s --tls-ca %s\n",
		files.CA, files.Cert, files.Key, files.CA)
	return nil
}

func pkiExportCmd() *cli.Command {
	return &cli.Command{
		Name:  "export",
		Usage: "lay out an NBD client's certificate, key and the CA for qemu or libnbd",
		Description: `Example:
   vdrepl pki export --dir /etc/vdrepl/pki --client kvm2.example.com --qemu /tmp/kvm2-tls
   vdrepl pki export --dir /etc/vdrepl/pki --client backup1 --libnbd /tmp/backup1-tls

Writes ca-cert.pem, client-cert.pem and client-key.pem (mode 0600) into the
directory (made, mode 0700, if missing): the names qemu's
tls-creds-x509 (endpoint=client) and libnbd's tls-certificates= read; the
two layouts are the same. Files of an earlier export there are replaced.
Copy the directory to the client's host, readable by the user the client
runs as (qemu often runs as its own user), then
   qemu-img info --object tls-creds-x509,id=tls0,dir=DIR,endpoint=client \
     --image-opts driver=nbd,host=NBDHOST,port=10809,export=VM/DISK,tls-creds=tls0
   nbdinfo 'nbds://NBDHOST:10809/VM/DISK?tls-certificates=DIR'
NBDHOST must be a name or address in the NBD host's certificate.`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "dir", Required: true, Usage: "directory holding ca.crt and the client's NAME.crt and NAME.key"},
			&cli.StringFlag{Name: "client", Required: true, Usage: "the client certificate's name, as given to pki issue --client"},
			&cli.StringFlag{Name: "qemu", Usage: "directory for qemu's tls-creds-x509 (dir=)"},
			&cli.StringFlag{Name: "libnbd", Usage: "directory for libnbd's tls-certificates= (nbdinfo, nbdcopy, fio's nbd engine)"},
		},
		Action: pkiExportAction,
	}
}

func pkiExportAction(c *cli.Context) error {
	dir, err := filepath.Abs(c.String("dir"))
	if err != nil {
		return err
	}
	var outs []string
	for _, f := range []string{"qemu", "libnbd"} {
		if o := c.String(f); o != "" {
			outs = append(outs, o)
		}
	}
	if len(outs) == 0 {
		return fmt.Errorf("pki export: give --qemu DIR or --libnbd DIR")
	}
	for _, out := range outs {
		out, err := filepath.Abs(out)
		if err != nil {
			return err
		}
		files, err := pki.ExportClient(dir, c.String("client"), out)
		if err != nil {
			return err
		}
		fmt.Fprintf(c.App.Writer, "wrote %s, %s and %s (client %s)\n", files.CA, files.Cert, files.Key, c.String("client"))
	}
	return nil
}

func pkiShowCmd() *cli.Command {
	return &cli.Command{
		Name:      "show",
		Usage:     "describe a certificate file and warn about problems",
		ArgsUsage: "FILE",
		Description: `Example:
   vdrepl pki show /etc/vdrepl/pki/replica1.example.com.crt

Warns if the certificate has expired, expires within 30 days, or lacks the
serverAuth or clientAuth usage vdrepl needs.`,
		Flags:  []cli.Flag{&cli.BoolFlag{Name: "json", Usage: "print JSON"}},
		Action: pkiShowAction,
	}
}

func pkiShowAction(c *cli.Context) error {
	if c.NArg() != 1 {
		return fmt.Errorf("pki show takes exactly one certificate file")
	}
	file := c.Args().First()
	data, err := os.ReadFile(file)
	if err != nil {
		return err
	}
	info, err := pki.Describe(data)
	if err != nil {
		return fmt.Errorf("%s: %w", file, err)
	}
	now := time.Now()
	warnings := info.Warnings(now)
	if c.Bool("json") {
		if warnings == nil {
			warnings = []string{}
		}
		return printJSON(c.App.Writer, struct {
			pki.Info
			Warnings []string `json:"warnings"`
		}{info, warnings})
	}
	w := c.App.Writer
	fmt.Fprintf(w, "subject:   %s\nissuer:    %s\n", info.Subject, info.Issuer)
	if names := slices.Concat(info.DNSNames, info.IPs); len(names) > 0 {
		fmt.Fprintf(w, "names:     %s\n", strings.Join(names, ", "))
	}
	if info.IsCA {
		fmt.Fprintln(w, "CA:        yes")
	}
	if len(info.EKU) > 0 {
		fmt.Fprintf(w, "usage:     %s\n", strings.Join(info.EKU, ", "))
	}
	fmt.Fprintf(w, "key:       %s\nvalid:     %s to %s\nserial:    %s\n",
		info.KeyType, info.NotBefore.Format(time.RFC3339), info.NotAfter.Format(time.RFC3339), info.Serial)
	for _, s := range warnings {
		fmt.Fprintf(w, "warning: %s\n", s)
	}
	return nil
}
