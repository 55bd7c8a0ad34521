// Command vdrepl replicates VM disks block by block. This file wires the CLI:
// actions parse flags into a config, call the library, and return its error.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/vdrepl/vdrepl/control"
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
		Commands: []*cli.Command{serveCmd(), vmCmd(), mountCmd(), statusCmd(), replicationCmd(), replicaCmd(), pkiCmd(), doctorCmd(), failoverCmd(), verifyCmd()},
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

// oneVM is the single VM name a command takes.
func oneVM(c *cli.Context, what string) (string, error) {
	if c.NArg() != 1 {
		return "", fmt.Errorf("%s takes exactly one VM name, got %d arguments", what, c.NArg())
	}
	return c.Args().First(), nil
}

// withDefaultPort adds port to an address given without one.
func withDefaultPort(addr, port string) string {
	if _, _, err := net.SplitHostPort(addr); err == nil {
		return addr
	}
	return net.JoinHostPort(strings.Trim(addr, "[]"), port)
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
		Action: mountAction,
	}
}

func mountAction(c *cli.Context) error {
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
}

func statusCmd() *cli.Command {
	return &cli.Command{
		Name:  "status",
		Usage: "show the daemon's state, VMs and journals",
		Flags: []cli.Flag{&cli.BoolFlag{Name: "json", Usage: "print JSON"}},
		Description: `Example:
   vdrepl status
   vdrepl --control /run/vdrepl/control.sock status --json`,
		Action: statusAction,
	}
}

func statusAction(c *cli.Context) error {
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
