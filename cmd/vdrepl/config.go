package main

// The config file. It is TOML whose top-level keys are the long names of the
// flags of `vdrepl serve` and of the global --state and --control, with the
// values the flags take:
//
//	state = "/var/lib/vdrepl"
//	nbd = ["unix:/run/vdrepl/nbd.sock", "tcp:0.0.0.0:10809"]
//	sync-interval = "1s"
//	log-json = true
//
// Strings for string flags (sizes too: "20G"), a list of strings (or one
// string) for repeatable flags, a duration string for duration flags, true or
// false for switches. Precedence, highest first: the command line, the
// flag's environment variable, the file, the flag's default. One exception
// keeps `vdrepl --state DIR ...` pointing at the daemon of DIR: a --state
// given without --control ignores the file's control (the socket is then
// STATE/control.sock). Any other key, a table, or a value of the wrong type
// is an error naming the key and the file. scripts/vdrepl.toml.example
// documents every key.

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"slices"
	"strconv"
	"time"

	"github.com/BurntSushi/toml"
	"github.com/urfave/cli/v2"
)

// defaultConfigPath is read when --config is not given; it may be missing.
const defaultConfigPath = "/etc/vdrepl/vdrepl.toml"

var (
	errConfigMissing = errors.New("config: file not found")
	errConfigSyntax  = errors.New("config: syntax error")
	errConfigKey     = errors.New("config: unknown key")
	errConfigValue   = errors.New("config: bad value")
)

// fileConfig is a parsed config file: for each key, the arguments to give
// the flag of that name, in order (more than one for a repeatable flag).
type fileConfig struct {
	path   string
	values map[string][]string
}

// configFlags are the flags a config file may set: the app's global flags
// but --config, and those of `serve`; never help or hidden ones.
func configFlags(app *cli.App) []cli.Flag {
	flags := slices.Clone(app.Flags)
	if serve := app.Command("serve"); serve != nil {
		flags = append(flags, serve.Flags...)
	}
	return slices.DeleteFunc(flags, func(f cli.Flag) bool {
		name := f.Names()[0]
		if v, ok := f.(cli.VisibleFlag); ok && !v.IsVisible() {
			return true
		}
		return name == "config" || name == "help"
	})
}

// loadConfig reads and parses the file at path. A missing file is an error
// only when explicit (given with --config or VDREPL_CONFIG); otherwise it
// reads as an empty config.
func loadConfig(path string, explicit bool, flags []cli.Flag) (*fileConfig, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		if explicit {
			return nil, fmt.Errorf("%w: %s", errConfigMissing, path)
		}
		return &fileConfig{path: path}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	return parseConfig(path, data, flags)
}

// parseConfig checks every key of data against flags and turns each value
// into the text the flag's Set takes. path only names the file in errors.
func parseConfig(path string, data []byte, flags []cli.Flag) (*fileConfig, error) {
	var raw map[string]any
	md, err := toml.Decode(string(data), &raw)
	if err != nil {
		var pe toml.ParseError
		if errors.As(err, &pe) {
			return nil, fmt.Errorf("%w: %s:%d: %s", errConfigSyntax, path, pe.Position.Line, pe.Message)
		}
		return nil, fmt.Errorf("%w: %s: %v", errConfigSyntax, path, err)
	}
	byName := map[string]cli.Flag{}
	for _, f := range flags {
		byName[f.Names()[0]] = f
	}
	cfg := &fileConfig{path: path, values: map[string][]string{}}
	seen := map[string]bool{}
	for _, key := range md.Keys() { // in file order, so the first bad key is reported
		k := key[0] // "a.b = 1" and "[a]" both make a table a
		if seen[k] {
			continue
		}
		seen[k] = true
		f, ok := byName[k]
		if !ok {
			return nil, fmt.Errorf("%w %q in %s (keys are the long flag names of `vdrepl serve` and the global state and control; see `vdrepl serve --help`)", errConfigKey, k, path)
		}
		args, err := flagArgs(f, raw[k])
		if err != nil {
			return nil, fmt.Errorf("%w in %s: key %q: %v", errConfigValue, path, k, err)
		}
		cfg.values[k] = args
	}
	return cfg, nil
}

// flagArgs converts a TOML value into the arguments of the flag's Set.
func flagArgs(f cli.Flag, v any) ([]string, error) {
	switch f.(type) {
	case *cli.StringFlag:
		if s, ok := v.(string); ok {
			return []string{s}, nil
		}
		return nil, fmt.Errorf("want a string, got %s", tomlType(v))
	case *cli.StringSliceFlag:
		switch v := v.(type) {
		case string:
			return []string{v}, nil
		case []any:
			out := make([]string, 0, len(v))
			for i, e := range v {
				s, ok := e.(string)
				if !ok {
					return nil, fmt.Errorf("element %d: want a string, got %s", i, tomlType(e))
				}
				out = append(out, s)
			}
			return out, nil
		}
		return nil, fmt.Errorf("want a list of strings, got %s", tomlType(v))
	case *cli.DurationFlag:
		s, ok := v.(string)
		if !ok {
			return nil, fmt.Errorf(`want a duration string such as "1s" or "5m", got %s`, tomlType(v))
		}
		if _, err := time.ParseDuration(s); err != nil {
			return nil, fmt.Errorf(`want a duration such as "1s" or "5m": %w`, err)
		}
		return []string{s}, nil
	case *cli.BoolFlag:
		if b, ok := v.(bool); ok {
			return []string{strconv.FormatBool(b)}, nil
		}
		return nil, fmt.Errorf("want true or false, got %s", tomlType(v))
	case *cli.Float64Flag:
		switch v := v.(type) {
		case float64:
			return []string{strconv.FormatFloat(v, 'g', -1, 64)}, nil
		case int64:
			return []string{strconv.FormatInt(v, 10)}, nil
		}
		return nil, fmt.Errorf("want a number, got %s", tomlType(v))
	case *cli.IntFlag, *cli.Int64Flag:
		if n, ok := v.(int64); ok {
			return []string{strconv.FormatInt(n, 10)}, nil
		}
		return nil, fmt.Errorf("want an integer, got %s", tomlType(v))
	}
	return nil, fmt.Errorf("flag type %T cannot be set from a config file", f)
}

// tomlType names a decoded TOML value's type for error messages.
func tomlType(v any) string {
	switch v.(type) {
	case string:
		return "a string"
	case int64:
		return "an integer"
	case float64:
		return "a float"
	case bool:
		return "a boolean"
	case []any, []map[string]any:
		return "a list"
	case map[string]any:
		return "a table"
	case time.Time:
		return "a date"
	}
	return fmt.Sprintf("%T", v)
}

// apply sets each of names that cfg holds and that neither the command line
// nor the environment set. It decides what is set before setting anything,
// since setting a flag marks it set.
func (cfg *fileConfig) apply(c *cli.Context, names []string) error {
	var todo []string
	for _, n := range names {
		if _, ok := cfg.values[n]; ok && !c.IsSet(n) {
			todo = append(todo, n)
		}
	}
	for _, n := range todo {
		for _, a := range cfg.values[n] {
			if err := c.Set(n, a); err != nil {
				return fmt.Errorf("%w in %s: key %q: %v", errConfigValue, cfg.path, n, err)
			}
		}
	}
	return nil
}

// configKey keys the parsed config in cli.App.Metadata between loadAppConfig
// and applyServeConfig.
const configKey = "vdrepl.config"

// loadAppConfig is the app's Before: it reads --config and applies the
// global flags; `serve` applies its own in applyServeConfig.
func loadAppConfig(c *cli.Context) error {
	cfg, err := loadConfig(c.String("config"), c.IsSet("config"), configFlags(c.App))
	if err != nil {
		if c.Args().First() == "verify" {
			// Exit status 1 is verify's "blocks differ".
			return cli.Exit("vdrepl: "+err.Error(), verifyFailed)
		}
		return err
	}
	if c.App.Metadata == nil {
		c.App.Metadata = map[string]any{}
	}
	c.App.Metadata[configKey] = cfg
	names := []string{"state", "control"}
	if c.IsSet("state") && !c.IsSet("control") {
		names = names[:1]
	}
	return cfg.apply(c, names)
}

// applyServeConfig is serve's Before.
func applyServeConfig(c *cli.Context) error {
	cfg, _ := c.App.Metadata[configKey].(*fileConfig)
	if cfg == nil {
		return nil
	}
	var names []string
	for _, f := range c.Command.Flags {
		names = append(names, f.Names()[0])
	}
	return cfg.apply(c, names)
}
