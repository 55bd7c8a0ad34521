package main

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/urfave/cli/v2"
)

// host is the host a command about one VM runs on.
type host int

const (
	eitherHost  host = iota
	primaryHost      // where the VM runs and ships from
	replicaHost      // where its replica is kept
)

// vmAction runs action, a command about the VM named by the first
// argument, and adds to its error what the daemon knows of that name: the
// host to run the command on when it is the other side of a replication,
// or the VMs there are, with the closest name, when there is no such VM.
// command is the command as typed after "vdrepl" ("failover test").
func vmAction(command string, runsOn host, action cli.ActionFunc) cli.ActionFunc {
	return func(c *cli.Context) error {
		err := action(c)
		if err == nil || c.NArg() == 0 {
			return err
		}
		return explainVM(c, command, runsOn, c.Args().First(), err)
	}
}

// explainVM asks the daemon which VMs it has rather than reading err: the
// control client hands on the daemon's answer as text, and an unknown name
// is what the lists show. A daemon that cannot answer leaves err as it is.
func explainVM(c *cli.Context, command string, runsOn host, vm string, err error) error {
	ctx, cancel := context.WithTimeout(c.Context, 5*time.Second)
	defer cancel()
	cl := client(c)
	vms, lerr := cl.VMs(ctx)
	if lerr != nil {
		return err
	}
	rep, rerr := cl.Replication(ctx, "")
	if rerr != nil {
		return err
	}
	var names []string
	registered := false
	for _, v := range vms {
		names = append(names, v.Name)
		registered = registered || v.Name == vm
	}
	primaryOf, replicaOf := "", "" // the other side of vm's replication
	shipped := false
	for _, p := range rep.Primaries {
		names = append(names, p.VM)
		if p.VM == vm {
			shipped = true
			if p.Role == "primary" {
				replicaOf = p.Spec.Replica
			}
		}
	}
	kept := false
	for _, r := range rep.Replicas {
		names = append(names, r.VM)
		if r.VM == vm {
			kept, primaryOf = true, r.Primary
		}
	}
	switch {
	case runsOn == replicaHost && replicaOf != "" && !kept:
		return fmt.Errorf("%w; %s is a primary VM on this host; run `vdrepl %s %s` on its replica host (%s)", err, vm, command, vm, replicaOf)
	case runsOn == primaryHost && kept && !registered && !shipped:
		return fmt.Errorf("%w; %s is a replica VM on this host; run `vdrepl %s %s` on its primary host (%s)", err, vm, command, vm, primaryOf)
	case registered || shipped || kept:
		return err
	}
	slices.Sort(names)
	names = slices.Compact(names)
	if len(names) == 0 {
		return fmt.Errorf("%w; this host has no VMs", err)
	}
	if best := closest(vm, names); best != "" {
		return fmt.Errorf("%w; did you mean %s? (VMs on this host: %s)", err, best, strings.Join(names, ", "))
	}
	return fmt.Errorf("%w (VMs on this host: %s)", err, strings.Join(names, ", "))
}

// closest is the name of names nearest to s by edit distance, if that is
// at most 2; the first of equals in names' order.
func closest(s string, names []string) string {
	best, bestD := "", 3
	for _, n := range names {
		if d := editDistance(s, n); d < bestD {
			best, bestD = n, d
		}
	}
	return best
}

// editDistance is the optimal string alignment distance of a and b in
// runes: insertions, deletions, substitutions and swaps of neighbours
// ("wbe1" is one from "web1") each count one.
func editDistance(a, b string) int {
	ra, rb := []rune(a), []rune(b)
	// d[i][j] is the distance of ra[:i] and rb[:j].
	d := make([][]int, len(ra)+1)
	for i := range d {
		d[i] = make([]int, len(rb)+1)
		d[i][0] = i
	}
	for j := range d[0] {
		d[0][j] = j
	}
	for i := 1; i <= len(ra); i++ {
		for j := 1; j <= len(rb); j++ {
			cost := 1
			if ra[i-1] == rb[j-1] {
				cost = 0
			}
			d[i][j] = min(d[i-1][j]+1, d[i][j-1]+1, d[i-1][j-1]+cost)
			if i > 1 && j > 1 && ra[i-1] == rb[j-2] && ra[i-2] == rb[j-1] {
				d[i][j] = min(d[i][j], d[i-2][j-2]+1)
			}
		}
	}
	return d[len(ra)][len(rb)]
}
