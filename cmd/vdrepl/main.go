// Command vdrepl replicates VM disks block by block. This file wires the CLI:
// actions parse flags into a config, call the library, and return its error.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/vdrepl/vdrepl/control"
	"github.com/vdrepl/vdrepl/daemon"
)

func main() {
	app := newApp()
	if err := app.Run(interspersed(app, os.Args)); err != nil {
		fmt.Fprintf(os.Stderr, "vdrepl: %v\n", err)
		os.Exit(1)
	}
}

func newApp() *cli.App {
	return &cli.App{
		Name:                 "vdrepl",
		Usage:                "replicate VM disks block by block to a replica host",
		EnableBashCompletion: true,
		Before:               loadAppConfig,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "config", Value: defaultConfigPath, EnvVars: []string{"VDREPL_CONFIG"},
				Usage: "config file (TOML) whose keys are the global and serve flags; flags override it; a missing default file is fine"},
			&cli.StringFlag{Name: "state", Value: control.DefaultStateDir, EnvVars: []string{"VDREPL_STATE"},
				Usage: "state directory of the daemon (registry, journals, sockets)"},
			&cli.StringFlag{Name: "control", EnvVars: []string{"VDREPL_CONTROL"},
				Usage: "control socket of the daemon (default: STATE/control.sock)"},
		},
		Commands: []*cli.Command{serveCmd(), vmCmd(), mountCmd(), statusCmd(), replicationCmd(), replicaCmd(), pkiCmd(), doctorCmd(), failoverCmd()},
	}
}

// interspersed lets flags follow positional arguments (`vm add NAME --disk
// X`, as the docs write it): urfave/cli v2 stops parsing flags at the first
// positional one, so the leaf command's flags are moved in front of its
// positional arguments. "--" ends the reordering.
func interspersed(app *cli.App, args []string) []string {
	// Shell completion: urfave/cli only sees its flag in last place.
	const complete = "--generate-bash-completion"
	if n := len(args); n > 1 && args[n-1] == complete {
		return append(interspersed(app, args[:n-1]), complete)
	}
	out := []string{args[0]}
	cmds := app.Commands
	i := 1
	// Global flags and the command path.
	var leaf *cli.Command
	for i < len(args) {
		a := args[i]
		if strings.HasPrefix(a, "-") {
			out = append(out, a)
			flags := app.Flags
			if leaf != nil {
				flags = leaf.Flags
			}
			if !strings.Contains(a, "=") && takesValue(flags, a) && i+1 < len(args) {
				out = append(out, args[i+1])
				i++
			}
			i++
			continue
		}
		var next *cli.Command
		for _, c := range cmds {
			if c.HasName(a) {
				next = c
			}
		}
		if next == nil {
			break
		}
		out = append(out, a)
		leaf, cmds = next, next.Subcommands
		i++
	}
	if leaf == nil {
		return append(out, args[i:]...)
	}
	var flags, pos []string
	for ; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			pos = append(pos, args[i:]...)
			break
		}
		if strings.HasPrefix(a, "-") && a != "-" {
			flags = append(flags, a)
			if !strings.Contains(a, "=") && takesValue(leaf.Flags, a) && i+1 < len(args) {
				flags = append(flags, args[i+1])
				i++
			}
			continue
		}
		pos = append(pos, a)
	}
	return append(append(out, flags...), pos...)
}

func takesValue(flags []cli.Flag, arg string) bool {
	name := strings.TrimLeft(arg, "-")
	for _, f := range flags {
		for _, n := range f.Names() {
			if n == name {
				_, isBool := f.(*cli.BoolFlag)
				return !isBool
			}
		}
	}
	return false
}

func controlPath(c *cli.Context) string {
	if p := c.String("control"); p != "" {
		return p
	}
	return control.DefaultControl(c.String("state"))
}

func client(c *cli.Context) *control.Client { return control.NewClient(controlPath(c)) }

func signalContext(c *cli.Context) (context.Context, context.CancelFunc) {
	return signal.NotifyContext(c.Context, os.Interrupt, syscall.SIGTERM)
}

func serveCmd() *cli.Command {
	return &cli.Command{
		Name:  "serve",
		Usage: "run the host daemon: serve every registered VM's disks over NBD, ship replicated VMs, and (with --replica-listen) receive replicas",
		Description: `Example:
   vdrepl --state /var/lib/vdrepl serve --nbd unix:/run/vdrepl/nbd.sock --nbd tcp:0.0.0.0:10809

With no --nbd the daemon listens on unix:STATE/nbd.sock and tcp:127.0.0.1:10809.
A guest attaches a disk with
   -drive file=nbd+unix:///VM/DISK?socket=STATE/nbd.sock,format=raw,cache=none`,
		Flags: []cli.Flag{
			&cli.StringSliceFlag{Name: "nbd", Usage: "NBD listen address, unix:PATH or tcp:HOST:PORT (repeatable)"},
			&cli.StringFlag{Name: "journal-cap", Usage: "journal cap per VM, e.g. 20G (default: half the VM's disk size)"},
			&cli.DurationFlag{Name: "sync-interval", Usage: "how often journals sync when clients never flush (default 1s)"},
			&cli.StringFlag{Name: "tls-cert", EnvVars: []string{"VDREPL_TLS_CERT"}, Usage: "this host's certificate (from `vdrepl pki issue`), used to ship and to serve as a replica"},
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
			&cli.StringFlag{Name: "log-level", Value: "info", Usage: "debug, info, warn or error"},
			&cli.BoolFlag{Name: "log-json", Usage: "log JSON lines instead of text"},
		},
		Action: func(c *cli.Context) error {
			var level slog.Level
			if err := level.UnmarshalText([]byte(c.String("log-level"))); err != nil {
				return fmt.Errorf("--log-level: %w", err)
			}
			opts := &slog.HandlerOptions{Level: level}
			var h slog.Handler = slog.NewTextHandler(os.Stderr, opts)
			if c.Bool("log-json") {
				h = slog.NewJSONHandler(os.Stderr, opts)
			}
			cfg := daemon.Config{
				StateDir:     c.String("state"),
				Control:      c.String("control"),
				NBD:          c.StringSlice("nbd"),
				SyncInterval: c.Duration("sync-interval"),
				Logger:       slog.New(h),

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
			if s := c.String("resync-block-size"); s != "" {
				n, err := daemon.ParseSize(s)
				if err != nil || n < 4096 || n > 1<<20 || n&(n-1) != 0 {
					return fmt.Errorf("--resync-block-size %q: want a power of two from 4K to 1M", s)
				}
				cfg.ResyncBlockSize = n
			}
			if cfg.ReplicaListen != "" {
				cfg.ReplicaListen = withDefaultPort(cfg.ReplicaListen, "8443")
			}
			switch s := c.String("memory-limit"); s {
			case "auto", "":
			case "off":
				cfg.MemoryLimit = -1
			default:
				n, err := daemon.ParseSize(s)
				if err != nil || n <= 0 {
					return fmt.Errorf("--memory-limit %q: want auto, off or a size like 512M", s)
				}
				cfg.MemoryLimit = n
			}
			if s := c.String("journal-cap"); s != "" {
				n, err := daemon.ParseSize(s)
				if err != nil {
					return fmt.Errorf("--journal-cap: %w", err)
				}
				cfg.JournalCap = n
			}
			d, err := daemon.New(cfg)
			if err != nil {
				return err
			}
			ctx, stop := signalContext(c)
			defer stop()
			return d.Run(ctx)
		},
		// Flags override the config file: applied before Action reads them.
		Before: applyServeConfig,
	}
}

func vmCmd() *cli.Command {
	return &cli.Command{
		Name:  "vm",
		Usage: "register, list and remove VMs",
		Description: `Example:
   vdrepl vm add web1 --disk /srv/vm/web1.img:20G
   vdrepl vm list`,
		Subcommands: []*cli.Command{
			{
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
				Action: func(c *cli.Context) error {
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
				},
			},
			{
				Name:  "list",
				Usage: "list registered VMs and their disks",
				Flags: []cli.Flag{&cli.BoolFlag{Name: "json", Usage: "print JSON"}},
				Description: `Example:
   vdrepl vm list
   vdrepl vm list --json

One line per disk: its NBD export VM/DISK, size, image and state (ok, not
served, resync required, or the error that stopped it).`,
				Action: func(c *cli.Context) error {
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
					tw := tabwriter.NewWriter(c.App.Writer, 0, 4, 2, ' ', 0)
					fmt.Fprintln(tw, "EXPORT\tSIZE\tIMAGE\tSTATE")
					for _, v := range vms {
						for i, d := range v.Disks {
							fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", v.Exports[i], humanBytes(d.Size), d.Path, vmState(v))
						}
					}
					return tw.Flush()
				},
			},
			{
				Name:      "remove",
				Usage:     "stop serving a VM and forget it (its images stay)",
				ArgsUsage: "NAME",
				Description: `Example:
   vdrepl vm remove web1

Refused while a client has one of the VM's disks open or while the VM is
replicated (run vdrepl replication disable web1 first).`,
				Action: func(c *cli.Context) error {
					if c.NArg() != 1 {
						return fmt.Errorf("vm remove takes exactly one VM name")
					}
					return client(c).RemoveVM(c.Context, c.Args().First())
				},
			},
			{
				Name:      "seal",
				Usage:     "close the VM's current cycle now (all its disks at one instant)",
				ArgsUsage: "NAME",
				Flags:     []cli.Flag{&cli.BoolFlag{Name: "json", Usage: "print JSON"}},
				Description: `Example:
   vdrepl vm seal web1`,
				Action: func(c *cli.Context) error {
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
						fmt.Fprintf(c.App.Writer, "cycle %d sealed: %s written (not kept: replication is not enabled for this VM)\n", info.Cycle, humanBytes(info.Bytes))
						return nil
					}
					fmt.Fprintf(c.App.Writer, "cycle %d sealed: %s written, %d distinct blocks to ship\n", info.Cycle, humanBytes(info.Bytes), info.Blocks)
					return nil
				},
			},
		},
	}
}

func vmState(v control.VMInfo) string {
	switch {
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

func mountCmd() *cli.Command {
	return &cli.Command{
		Name:      "mount",
		Usage:     "show every VM disk as MOUNTPOINT/VM/DISK.img through FUSE",
		ArgsUsage: "MOUNTPOINT",
		Description: `Example:
   vdrepl mount /mnt/vdrepl &
   losetup --find --show /mnt/vdrepl/web1/root.img

Writes through the mount are journaled like NBD writes; fsync makes them
durable. The mount ends on Ctrl-C, SIGTERM or fusermount3 -u MOUNTPOINT.`,
		Action: func(c *cli.Context) error {
			if c.NArg() != 1 {
				return fmt.Errorf("mount takes exactly one mount point")
			}
			mp, err := filepath.Abs(c.Args().First())
			if err != nil {
				return err
			}
			ctx, stop := signalContext(c)
			defer stop()
			return client(c).Mount(ctx, mp, func() {
				fmt.Fprintf(c.App.Writer, "mounted %s\n", mp)
			})
		},
	}
}

func statusCmd() *cli.Command {
	return &cli.Command{
		Name:  "status",
		Usage: "show the daemon's state, VMs and journals",
		Flags: []cli.Flag{&cli.BoolFlag{Name: "json", Usage: "print JSON"}},
		Description: `Example:
   vdrepl status
   vdrepl --control /run/vdrepl/control.sock status --json`,
		Action: func(c *cli.Context) error {
			s, err := client(c).Status(c.Context)
			if err != nil {
				return err
			}
			if c.Bool("json") {
				return printJSON(c.App.Writer, s)
			}
			w := c.App.Writer
			fmt.Fprintf(w, "state:         %s\nlast shutdown: %s\nnbd:           %s\n", s.StateDir, s.LastShutdown, strings.Join(s.NBD, ", "))
			if len(s.Mounts) > 0 {
				fmt.Fprintf(w, "mounts:        %s\n", strings.Join(s.Mounts, ", "))
			}
			tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "\nVM\tDISKS\tSTATE\tCYCLE\tJOURNAL\tCAP")
			for _, v := range s.VMs {
				cycle, used, capb := "-", "-", "-"
				if j := v.Journal; j != nil {
					cycle = fmt.Sprint(j.OpenCycle)
					used = humanBytes(j.JournalBytes)
					capb = humanBytes(j.Cap)
				}
				fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%s\n", v.Name, len(v.Disks), vmState(v), cycle, used, capb)
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			for _, t := range s.Tests {
				fmt.Fprintf(w, "test failover: %s from recovery point %s (cycle %d), exports %s, since %s\n",
					t.VM, t.Point, t.Cycle, strings.Join(t.Exports, ", "), t.Started.Local().Format(time.DateTime))
			}
			for _, warn := range s.Warnings {
				fmt.Fprintf(w, "warning: %s\n", warn)
			}
			return nil
		},
	}
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
