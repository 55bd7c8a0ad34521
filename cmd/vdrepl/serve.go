package main

import (
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/vdrepl/vdrepl/daemon"
)

func serveCmd() *cli.Command {
	return &cli.Command{
		Name:  "serve",
		Usage: "run the host daemon: serve every registered VM's disks over NBD, ship replicated VMs, and (with --replica-listen) receive replicas",
		Description: `Example:
   vdrepl --state /var/lib/vdrepl serve --nbd unix:/run/vdrepl/nbd.sock --nbd-group kvm

With no --nbd the daemon listens on unix:STATE/nbd.sock only. Unix sockets
are mode 0660, owned by the daemon's user and by --nbd-group (so a qemu
running as its own user can be let in), and give full access to every
export. A guest on this host attaches a disk with
   -drive file=nbd+unix:///VM/DISK?socket=STATE/nbd.sock,format=raw,cache=none

A TCP listener speaks NBD over TLS only (STARTTLS, TLS 1.3): the server
presents --tls-cert, and clients must present a certificate from --tls-ca
("vdrepl pki issue --client") and be allowed the export ("vdrepl nbd allow
add"). For guests on other hosts:
   vdrepl serve --tls-cert host1.crt --tls-key host1.key --tls-ca ca.crt --nbd tcp:0.0.0.0:10809
Plain NBD over TCP is for this host's own tools only, on a loopback
address, and must be named:
   vdrepl serve --nbd tcp:127.0.0.1:10809 --nbd-insecure`,
		Flags: []cli.Flag{
			&cli.StringSliceFlag{Name: "nbd", Usage: "NBD listen address, unix:PATH or tcp:HOST:PORT (repeatable; TCP is TLS-only unless --nbd-insecure)"},
			&cli.StringFlag{Name: "nbd-group", Usage: "group of the NBD unix sockets (mode 0660), e.g. the group qemu runs in"},
			&cli.BoolFlag{Name: "nbd-insecure", Usage: "serve the TCP listeners as plain NBD, without TLS or client certificates; only on a loopback address"},
			&cli.StringFlag{Name: "journal-cap", Usage: "journal cap per VM, e.g. 20G (default: half the VM's disk size)"},
			&cli.DurationFlag{Name: "sync-interval", Value: time.Second, Usage: "how often journals sync when clients never flush"},
			&cli.StringFlag{Name: "tls-cert", EnvVars: []string{"VDREPL_TLS_CERT"}, Usage: "this host's certificate (made by \"vdrepl pki issue\"), used to ship and to serve as a replica"},
			&cli.StringFlag{Name: "tls-key", EnvVars: []string{"VDREPL_TLS_KEY"}, Usage: "the certificate's private key"},
			&cli.StringFlag{Name: "tls-ca", EnvVars: []string{"VDREPL_TLS_CA"}, Usage: "the CA certificate peers must chain to"},
			&cli.StringFlag{Name: "replica-listen", Usage: "enable the replica role on HOST:PORT (HTTPS, mutual TLS; port 8443 if omitted)"},
			&cli.StringFlag{Name: "bandwidth-limit", Usage: "cap all shipping of this host: 50MB/s, 100Mbit/s, or a schedule like 08:00-18:00=20MB/s,*=unlimited"},
			&cli.StringFlag{Name: "resync-window", Usage: "when automatic resyncs may run, HH:MM-HH:MM local time (default 18:30-06:00)"},
			&cli.StringFlag{Name: "resync-block-size", Usage: "checksum block of resyncs, a power of two from 4K to 1M (default 16K, measured in ship/blocksize_test.go; 4K suits links well below 50 Mbit/s)"},
			&cli.StringFlag{Name: "metrics-listen", Usage: "serve Prometheus metrics on HOST:PORT at /metrics"},
			&cli.DurationFlag{Name: "quiesce-timeout", Value: daemon.DefaultQuiesceTimeout, Usage: "longest a guest stays frozen for an application-consistent point; past it the guest is thawed and a standard point taken"},
			&cli.StringFlag{Name: "memory-limit", Value: "auto", Usage: "soft memory limit of the daemon: auto (128 MiB + 96 MiB per VM), a size like 1G, or off; GOMEMLIMIT wins"},
			&cli.Float64Flag{Name: "retry-scale", Value: 1, Hidden: true, Usage: "multiply retry back-off (tests)"},
			&cli.BoolFlag{Name: "no-block-tree", Hidden: true, Usage: "keep no block trees (bench/fio.sh measures their cost)"},
			&cli.StringFlag{Name: "log-level", Value: "info", Usage: "debug, info, warn or error"},
			&cli.BoolFlag{Name: "log-json", Usage: "log JSON lines instead of text"},
		},
		Action: serveAction,
		// Flags override the config file: applied before Action reads them.
		Before: applyServeConfig,
	}
}

func serveAction(c *cli.Context) error {
	cfg, err := serveConfig(c)
	if err != nil {
		return err
	}
	d, err := daemon.New(cfg)
	if err != nil {
		return err
	}
	ctx, stop := signalContext(c)
	defer stop()
	return d.Run(ctx)
}

// serveConfig reads serve's flags into the daemon's config.
func serveConfig(c *cli.Context) (daemon.Config, error) {
	logger, err := serveLogger(c)
	if err != nil {
		return daemon.Config{}, err
	}
	cfg := daemon.Config{
		StateDir:     c.String("state"),
		Control:      c.String("control"),
		NBD:          c.StringSlice("nbd"),
		NBDGroup:     c.String("nbd-group"),
		NBDInsecure:  c.Bool("nbd-insecure"),
		SyncInterval: c.Duration("sync-interval"),
		Logger:       logger,

		TLSCert:        c.String("tls-cert"),
		TLSKey:         c.String("tls-key"),
		TLSCA:          c.String("tls-ca"),
		ReplicaListen:  c.String("replica-listen"),
		BandwidthLimit: c.String("bandwidth-limit"),
		ResyncWindow:   c.String("resync-window"),
		MetricsListen:  c.String("metrics-listen"),
		QuiesceTimeout: c.Duration("quiesce-timeout"),
		RetryScale:     c.Float64("retry-scale"),
	}
	cfg.NoBlockTree = c.Bool("no-block-tree")
	if s := c.String("resync-block-size"); s != "" {
		n, err := daemon.ParseSize(s)
		if err != nil || n < 4096 || n > 1<<20 || n&(n-1) != 0 {
			return daemon.Config{}, fmt.Errorf("--resync-block-size %q: want a power of two from 4K to 1M", s)
		}
		cfg.ResyncBlockSize = n
	}
	if cfg.ReplicaListen != "" {
		cfg.ReplicaListen = withDefaultPort(cfg.ReplicaListen, "8443")
	}
	if cfg.MemoryLimit, err = memoryLimit(c.String("memory-limit")); err != nil {
		return daemon.Config{}, err
	}
	if s := c.String("journal-cap"); s != "" {
		n, err := daemon.ParseSize(s)
		if err != nil {
			return daemon.Config{}, fmt.Errorf("--journal-cap: %w", err)
		}
		cfg.JournalCap = n
	}
	return cfg, nil
}

// serveLogger is the daemon's logger as --log-level and --log-json ask.
func serveLogger(c *cli.Context) (*slog.Logger, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(c.String("log-level"))); err != nil {
		return nil, fmt.Errorf("--log-level: %w", err)
	}
	opts := &slog.HandlerOptions{Level: level}
	var h slog.Handler = slog.NewTextHandler(os.Stderr, opts)
	if c.Bool("log-json") {
		h = slog.NewJSONHandler(os.Stderr, opts)
	}
	return slog.New(h), nil
}

// memoryLimit reads --memory-limit: 0 for auto, -1 for off, or a size.
func memoryLimit(s string) (int64, error) {
	switch s {
	case "auto", "":
		return 0, nil
	case "off":
		return -1, nil
	}
	n, err := daemon.ParseSize(s)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("--memory-limit %q: want auto, off or a size like 512M", s)
	}
	return n, nil
}
