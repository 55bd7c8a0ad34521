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
and copy ca.crt, HOST.crt and HOST.key to that host.`,
		Subcommands: []*cli.Command{pkiInitCmd(), pkiIssueCmd(), pkiShowCmd()},
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
		Usage: "issue a host certificate from the CA in DIR: DIR/HOST.crt and DIR/HOST.key",
		Description: `Example:
   vdrepl pki issue --dir /etc/vdrepl/pki --name replica1.example.com --san replica1 --san 10.0.0.7

The certificate serves the host both as TLS server and as TLS client. Its
names are --name and every --san (host names or IP addresses); a client
must connect by one of them. issue never replaces existing files: to renew,
move HOST.crt and HOST.key away first.`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "dir", Required: true, Usage: "directory holding ca.crt and ca.key"},
			&cli.StringFlag{Name: "name", Required: true, Usage: "host name: the certificate's name and the files' names"},
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
	opt := pki.IssueOptions{SANs: c.StringSlice("san"), RSA: c.Bool("rsa"), Validity: time.Duration(days) * 24 * time.Hour}
	files, err := pki.Issue(dir, c.String("name"), opt)
	if err != nil {
		return err
	}
	w := c.App.Writer
	fmt.Fprintf(w, "wrote %s\nwrote %s (private key: copy it to that host only)\n", files.Cert, files.Key)
	fmt.Fprintf(w, "use them on that host, with %s:\n   vdrepl serve --tls-cert %s --tls-key %s --tls-ca %s\n",
		files.CA, files.Cert, files.Key, files.CA)
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
