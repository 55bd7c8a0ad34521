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
	"runtime/debug"
	"slices"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/vdrepl/vdrepl/control"
	"github.com/vdrepl/vdrepl/internal/units"
)

func main() {
	app := newApp()
	if err := app.Run(interspersed(app, os.Args)); err != nil {
		fmt.Fprintf(os.Stderr, "vdrepl: %v\n", err)
		os.Exit(1)
	}
}

func newApp() *cli.App {
	app := &cli.App{
		Name:                 "vdrepl",
		Usage:                "replicate VM disks block by block to a replica host",
		Version:              buildVersion(),
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
		Commands: []*cli.Command{serveCmd(), vmCmd(), mountCmd(), statusCmd(), replicationCmd(), replicaCmd(), nbdCmd(), pkiCmd(), doctorCmd(), failoverCmd(), verifyCmd()},
	}
	var globals []string
	for _, f := range app.Flags {
		globals = append(globals, "--"+f.Names()[0])
	}
	app.OnUsageError = usageError("", globals)
	var walk func(cmds []*cli.Command, parent string)
	walk = func(cmds []*cli.Command, parent string) {
		for _, c := range cmds {
			path := strings.TrimSpace(parent + " " + c.Name)
			c.OnUsageError = usageError(path, globals)
			if path == "verify" {
				c.OnUsageError = verifyUsageError(c.OnUsageError)
			}
			walk(c.Subcommands, path)
		}
	}
	walk(app.Commands, "")
	return app
}

// usageError makes a wrong flag one line that says where to look, instead
// of urfave/cli's "Incorrect Usage" and a page of help. path is the
// command's ("vm list"; "" for the app itself).
func usageError(path string, globals []string) cli.OnUsageErrorFunc {
	prefix, help := "", "vdrepl --help"
	if path != "" {
		prefix, help = path+": ", "vdrepl "+path+" --help"
	}
	return func(_ *cli.Context, err error, _ bool) error {
		return fmt.Errorf("%s%w (`%s` lists the flags; the global flags %s may come anywhere)", prefix, err, help, strings.Join(globals, ", "))
	}
}

// version is set at link time (go build -ldflags "-X main.version=v1.2.3");
// without it buildVersion asks the build info.
var version string

// buildVersion is what `vdrepl --version` prints: the link-time version,
// else the module version the go command recorded (a tag, or a
// pseudo-version when it could read the repository), else "devel".
func buildVersion() string {
	if version != "" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return "devel"
}

// interspersed lets flags follow positional arguments (`vm add NAME --disk
// X`, as the docs write it): urfave/cli v2 stops parsing flags at the first
// positional one, so the leaf command's flags are moved in front of its
// positional arguments. A global flag (--state, --control, --config) given
// anywhere after the command is moved in front of the command, where
// urfave/cli v2 wants it, unless the command has a flag of that name.
// "--" ends the reordering.
func interspersed(app *cli.App, args []string) []string {
	// Shell completion: urfave/cli only sees its flag in last place.
	const complete = "--generate-bash-completion"
	if n := len(args); n > 1 && args[n-1] == complete {
		return append(interspersed(app, args[:n-1]), complete)
	}
	var global, path []string
	cmds := app.Commands
	i := 1
	// take moves the flag at args[i], and its value if it takes one, to
	// *to; to global when it comes before any command (cmd nil) or is a
	// global flag cmd lacks.
	take := func(to *[]string, cmd *cli.Command) {
		a := args[i]
		if cmd == nil || (!hasFlag(cmd.Flags, a) && hasFlag(app.Flags, a)) {
			to = &global
		}
		flags := app.Flags
		if to != &global {
			flags = cmd.Flags
		}
		*to = append(*to, a)
		if !strings.Contains(a, "=") && takesValue(flags, a) && i+1 < len(args) {
			i++
			*to = append(*to, args[i])
		}
		i++
	}
	// Global flags and the command path.
	var leaf *cli.Command
	for i < len(args) {
		a := args[i]
		if strings.HasPrefix(a, "-") {
			take(&path, leaf)
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
		path = append(path, a)
		leaf, cmds = next, next.Subcommands
		i++
	}
	if leaf == nil {
		return slices.Concat(args[:1], global, path, args[i:])
	}
	var flags, pos []string
	for i < len(args) {
		a := args[i]
		if a == "--" {
			pos = append(pos, args[i:]...)
			break
		}
		if strings.HasPrefix(a, "-") && a != "-" {
			take(&flags, leaf)
			continue
		}
		pos = append(pos, a)
		i++
	}
	if slices.Contains(flags, "--help") || slices.Contains(flags, "-h") {
		// urfave/cli would take a positional argument for a help topic:
		// `vm remove web1 --help` said "No help topic for 'web1'".
		pos = nil
	}
	return slices.Concat(args[:1], global, path, flags, pos)
}

// flagName is the name in a flag argument: "state" of "--state=/x".
func flagName(arg string) string {
	name, _, _ := strings.Cut(strings.TrimLeft(arg, "-"), "=")
	return name
}

func hasFlag(flags []cli.Flag, arg string) bool {
	name := flagName(arg)
	for _, f := range flags {
		if slices.Contains(f.Names(), name) {
			return true
		}
	}
	return false
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
durable. The mount ends on Ctrl-C, SIGTERM or fusermount3 -u MOUNTPOINT.
A stale vdrepl mount left on MOUNTPOINT by a daemon that died ("transport
endpoint is not connected") is detached first; a stale mount of another
file system there is left alone and the mount refused.`,
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
			used = units.FormatBytes(j.JournalBytes)
			capb = units.FormatBytes(j.Cap)
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
