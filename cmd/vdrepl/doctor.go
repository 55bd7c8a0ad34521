package main

import (
	"fmt"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/vdrepl/vdrepl/doctor"
)

func doctorCmd() *cli.Command {
	return &cli.Command{
		Name:      "doctor",
		Usage:     "check this host, the way to a replica and a VM's replication, and say what is wrong and how to fix it",
		ArgsUsage: "[VM]",
		Description: `Examples:
   vdrepl doctor                                  # this host and the replicas its VMs ship to
   vdrepl doctor web1                             # ... and web1's replication
   vdrepl doctor --replica replica.example.com:8443 --json

Checks FUSE, the state directory (writable, room for the journal caps) and
the NBD addresses; the replica's name (IPv4/IPv6), TCP directly and through
the daemon's HTTPS_PROXY, a full upload chunk, the TLS handshake both ways
(CA, expiry, usages, names), the allow-list and the clocks; and for a VM its
state, lag, journal fill and last error. Nothing on the replica changes.
Exits non-zero when a problem (not a warning) is found.`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "replica", Usage: "the replica's HOST:PORT to check (default: the VM's, or every replica of this host's VMs)"},
			&cli.BoolFlag{Name: "bypass-proxy", Usage: "check the direct way to --replica, as a VM replicated with --bypass-proxy goes"},
			&cli.StringSliceFlag{Name: "nbd", Usage: "NBD address to check, unix:PATH or tcp:HOST:PORT (default: the daemon's, or serve's defaults)"},
			&cli.StringFlag{Name: "tls-cert", EnvVars: []string{"VDREPL_TLS_CERT"}, Usage: "this host's certificate (default: the running daemon's)"},
			&cli.StringFlag{Name: "tls-key", EnvVars: []string{"VDREPL_TLS_KEY"}, Usage: "the certificate's private key"},
			&cli.StringFlag{Name: "tls-ca", EnvVars: []string{"VDREPL_TLS_CA"}, Usage: "the CA certificate"},
			&cli.DurationFlag{Name: "timeout", Value: 10 * time.Second, Usage: "how long each network step may take"},
			&cli.DurationFlag{Name: "upload-timeout", Value: 2 * time.Minute, Usage: "how long the upload of a full chunk may take"},
			&cli.BoolFlag{Name: "json", Usage: "print JSON"},
		},
		Action: doctorAction,
	}
}

func doctorAction(c *cli.Context) error {
	if c.NArg() > 1 {
		return fmt.Errorf("doctor takes at most one VM name, got %d arguments", c.NArg())
	}
	cfg := doctor.Config{
		Daemon:        client(c),
		StateDir:      c.String("state"),
		NBD:           c.StringSlice("nbd"),
		Replica:       c.String("replica"),
		VM:            c.Args().First(),
		TLSCert:       c.String("tls-cert"),
		TLSKey:        c.String("tls-key"),
		TLSCA:         c.String("tls-ca"),
		BypassProxy:   c.Bool("bypass-proxy"),
		Timeout:       c.Duration("timeout"),
		UploadTimeout: c.Duration("upload-timeout"),
	}
	if cfg.Replica != "" {
		cfg.Replica = withDefaultPort(cfg.Replica, "8443")
	}
	ctx, stop := signalContext(c)
	defer stop()
	rep := doctor.Run(ctx, cfg)
	if c.Bool("json") {
		if err := printJSON(c.App.Writer, rep); err != nil {
			return err
		}
	} else {
		tw := tabwriter.NewWriter(c.App.Writer, 0, 4, 2, ' ', 0)
		for _, f := range rep.Findings {
			fmt.Fprintf(tw, "%s\t%s\t%s\n", f.Severity, f.Check, f.Sentence())
		}
		tw.Flush()
		fmt.Fprintf(c.App.Writer, "\n%d problem(s), %d warning(s)\n", rep.Problems, rep.Warnings)
	}
	if rep.Problems > 0 {
		return fmt.Errorf("doctor found %d problem(s)", rep.Problems)
	}
	return nil
}
