package quiesce

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// quiesceFake is a Quiescer whose freeze and thaw are test functions; it
// records the calls, and barrier calls, in order.
type quiesceFake struct {
	mu     sync.Mutex
	events []string
	freeze func(ctx context.Context) error
	thaw   func(ctx context.Context) error
}

func (f *quiesceFake) event(e string) {
	f.mu.Lock()
	f.events = append(f.events, e)
	f.mu.Unlock()
}

func (f *quiesceFake) Freeze(ctx context.Context) error {
	f.event("freeze")
	if f.freeze == nil {
		return nil
	}
	return f.freeze(ctx)
}

func (f *quiesceFake) Thaw(ctx context.Context) error {
	f.event("thaw")
	if f.thaw == nil {
		return nil
	}
	return f.thaw(ctx)
}

// TestQuiescedBarrierLogic checks the order of freeze, barrier and thaw and
// what QuiescedBarrier reports, for every way a freeze or thaw can fail.
func TestQuiescedBarrierLogic(t *testing.T) {
	errFreeze := errors.New("freeze broke")
	errThaw := errors.New("thaw broke")
	errBarrier := errors.New("barrier broke")
	fail := func(err error) func(context.Context) error {
		return func(context.Context) error { return err }
	}
	untilDone := func(ctx context.Context) error { <-ctx.Done(); return ctx.Err() }

	tests := []struct {
		name          string
		freeze, thaw  func(context.Context) error
		barrierErr    error
		timeout       time.Duration
		events        []string
		appConsistent bool
		reasonIs      []error // nil: reason must be nil
	}{
		{name: "ok", timeout: time.Minute,
			events: []string{"freeze", "barrier(true)", "thaw"}, appConsistent: true},
		{name: "freeze fails", freeze: fail(errFreeze), timeout: time.Minute,
			events:   []string{"freeze", "thaw", "barrier(false)"},
			reasonIs: []error{ErrQuiesce, errFreeze}},
		{name: "freeze and thaw fail", freeze: fail(errFreeze), thaw: fail(errThaw), timeout: time.Minute,
			events:   []string{"freeze", "thaw", "barrier(false)"},
			reasonIs: []error{ErrQuiesce, errFreeze, errThaw}},
		{name: "thaw fails after barrier", thaw: fail(errThaw), timeout: time.Minute,
			events: []string{"freeze", "barrier(true)", "thaw"}, appConsistent: true,
			reasonIs: []error{ErrQuiesce, errThaw}},
		{name: "barrier fails", barrierErr: errBarrier, timeout: time.Minute,
			events: []string{"freeze", "barrier(true)", "thaw"}, appConsistent: true},
		{name: "barrier fails unfrozen", freeze: fail(errFreeze), barrierErr: errBarrier, timeout: time.Minute,
			events:   []string{"freeze", "thaw", "barrier(false)"},
			reasonIs: []error{ErrQuiesce, errFreeze}},
		{name: "freeze times out", freeze: untilDone, timeout: 50 * time.Millisecond,
			events:   []string{"freeze", "thaw", "barrier(false)"},
			reasonIs: []error{ErrQuiesce, context.DeadlineExceeded}},
		{name: "zero timeout", timeout: 0,
			events: []string{"barrier(false)"}, reasonIs: []error{ErrQuiesce}},
		{name: "negative timeout", timeout: -time.Second,
			events: []string{"barrier(false)"}, reasonIs: []error{ErrQuiesce}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			q := &quiesceFake{freeze: tc.freeze, thaw: tc.thaw}
			start := time.Now()
			res, ac, reason, err := QuiescedBarrier(t.Context(), q, tc.timeout, func(ac bool) (int, error) {
				q.event(fmt.Sprintf("barrier(%v)", ac))
				return 42, tc.barrierErr
			})
			if elapsed := time.Since(start); tc.timeout > 0 && elapsed > tc.timeout+10*time.Second {
				t.Errorf("took %v with timeout %v", elapsed, tc.timeout)
			}
			if res != 42 {
				t.Errorf("result %d, want the barrier's 42", res)
			}
			if !errors.Is(err, tc.barrierErr) || (tc.barrierErr == nil && err != nil) {
				t.Errorf("err %v, want the barrier's %v", err, tc.barrierErr)
			}
			if ac != tc.appConsistent {
				t.Errorf("appConsistent %v, want %v", ac, tc.appConsistent)
			}
			if !slices.Equal(q.events, tc.events) {
				t.Errorf("events %q, want %q", q.events, tc.events)
			}
			if tc.reasonIs == nil && reason != nil {
				t.Errorf("reason %v, want nil", reason)
			}
			for _, want := range tc.reasonIs {
				if !errors.Is(reason, want) {
					t.Errorf("reason %v does not wrap %v", reason, want)
				}
			}
			if reason != nil && errors.Is(reason, errBarrier) {
				t.Errorf("reason %v carries the barrier's error", reason)
			}
			t.Logf("reason: %v", reason)
		})
	}
}

// TestQuiescedBarrierContexts checks the deadline Freeze gets, and that Thaw
// runs with a live context of its own even when the caller's is cancelled.
func TestQuiescedBarrierContexts(t *testing.T) {
	const timeout = 5 * time.Second
	ctx, cancel := context.WithCancel(t.Context())
	var freezeDeadline, thawDeadline time.Time
	var thawErr error
	q := &quiesceFake{
		freeze: func(fctx context.Context) error {
			freezeDeadline, _ = fctx.Deadline()
			cancel() // the daemon shuts down mid-freeze
			<-fctx.Done()
			return fctx.Err()
		},
		thaw: func(tctx context.Context) error {
			thawDeadline, _ = tctx.Deadline()
			thawErr = tctx.Err()
			return nil
		},
	}
	start := time.Now()
	_, ac, reason, _ := QuiescedBarrier(ctx, q, timeout, func(ac bool) (struct{}, error) {
		return struct{}{}, nil
	})
	end := time.Now()
	if ac || !errors.Is(reason, ErrQuiesce) || !errors.Is(reason, context.Canceled) {
		t.Errorf("appConsistent %v, reason %v: want false and a cancelled freeze", ac, reason)
	}
	if freezeDeadline.Before(start.Add(timeout)) || freezeDeadline.After(end.Add(timeout)) {
		t.Errorf("freeze deadline %v, want the timeout %v after the call", freezeDeadline.Sub(start), timeout)
	}
	if thawErr != nil {
		t.Errorf("thaw ran with a dead context: %v", thawErr)
	}
	if thawDeadline.IsZero() || thawDeadline.After(time.Now().Add(timeout)) {
		t.Errorf("thaw deadline %v, want a deadline at most %v away", thawDeadline, timeout)
	}
}

// TestQuiescedBarrierPanic checks a guest is thawed when the barrier panics.
func TestQuiescedBarrierPanic(t *testing.T) {
	q := &quiesceFake{}
	func() {
		defer func() {
			if r := recover(); r != "boom" {
				t.Errorf("recovered %v, want the barrier's panic", r)
			}
		}()
		QuiescedBarrier(t.Context(), q, time.Minute, func(bool) (int, error) {
			q.event("barrier")
			panic("boom")
		})
	}()
	if want := []string{"freeze", "barrier", "thaw"}; !slices.Equal(q.events, want) {
		t.Errorf("events %q, want %q", q.events, want)
	}
}

// quiesceScript writes an executable shell script into dir.
func quiesceScript(t *testing.T, dir, name, body string) string {
	t.Helper()
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, []byte("#!/bin/sh\n"+body), 0o755); err != nil {
		t.Fatal(err)
	}
	return path
}

func quiesceReadLines(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
}

// TestQuiesceCommand runs a real script: freeze before the barrier, thaw
// after, with the extra args and the VM name.
func TestQuiesceCommand(t *testing.T) {
	dir := t.TempDir()
	log := filepath.Join(dir, "log")
	cmd := quiesceScript(t, dir, "quiesce", `printf '%s|' "$@" >> "$1"; echo >> "$1"`+"\n")
	q := CommandQuiescer{Cmd: cmd, Args: []string{log, "two words"}, VM: "vm1"}

	res, ac, reason, err := QuiescedBarrier(t.Context(), q, 10*time.Second, func(ac bool) (string, error) {
		if got, want := quiesceReadLines(t, log), []string{log + "|two words|vm1|freeze|"}; !slices.Equal(got, want) {
			t.Errorf("while frozen the command ran %q, want %q", got, want)
		}
		return "point", nil
	})
	if res != "point" || !ac || reason != nil || err != nil {
		t.Fatalf("QuiescedBarrier = %q, %v, %v, %v; want point, true, nil, nil", res, ac, reason, err)
	}
	want := []string{log + "|two words|vm1|freeze|", log + "|two words|vm1|thaw|"}
	if got := quiesceReadLines(t, log); !slices.Equal(got, want) {
		t.Errorf("command ran %q, want %q", got, want)
	}
}

// TestQuiesceCommandFailure checks a failing command's error carries its
// exit status and the first line of what it said.
func TestQuiesceCommandFailure(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		name, body string
		want       string // in the error
		notWant    string
		exitCode   int
	}{
		{name: "stderr", exitCode: 1,
			body:    "echo 'chatter on stdout'\necho '' >&2\necho 'fsfreeze: /mnt/x: freeze failed: Device or resource busy' >&2\necho 'second line' >&2\nexit 1\n",
			want:    "fsfreeze: /mnt/x: freeze failed: Device or resource busy",
			notWant: "second line"},
		{name: "stdout only", exitCode: 3,
			body: "echo 'no such VM'\nexit 3\n", want: "no such VM"},
		{name: "silent", exitCode: 7, body: "exit 7\n", want: "exit status 7"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			q := CommandQuiescer{Cmd: quiesceScript(t, dir, tc.name, tc.body), VM: "vm1"}
			err := q.Freeze(t.Context())
			if !errors.Is(err, ErrQuiesce) {
				t.Fatalf("Freeze = %v, want ErrQuiesce", err)
			}
			var exit *exec.ExitError
			if !errors.As(err, &exit) || exit.ExitCode() != tc.exitCode {
				t.Errorf("Freeze = %v, want exit status %d", err, tc.exitCode)
			}
			if !strings.Contains(err.Error(), tc.want) || (tc.notWant != "" && strings.Contains(err.Error(), tc.notWant)) {
				t.Errorf("Freeze = %q, want it to say %q (and not %q)", err, tc.want, tc.notWant)
			}
			if !strings.Contains(err.Error(), "vm1 freeze") {
				t.Errorf("Freeze = %q does not say which command failed", err)
			}
		})
	}

	t.Run("missing", func(t *testing.T) {
		q := CommandQuiescer{Cmd: filepath.Join(dir, "no-such-command"), VM: "vm1"}
		if err := q.Thaw(t.Context()); !errors.Is(err, ErrQuiesce) || !errors.Is(err, os.ErrNotExist) {
			t.Errorf("Thaw = %v, want ErrQuiesce and ErrNotExist", err)
		}
		if err := (CommandQuiescer{VM: "vm1"}).Freeze(t.Context()); !errors.Is(err, ErrQuiesce) {
			t.Errorf("Freeze without a command = %v, want ErrQuiesce", err)
		}
	})
}

// quiesceWaitFor polls cond until it holds or the deadline passes.
func quiesceWaitFor(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not %s after %v", what, within)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// quiesceProcState is the state letter of a process ('R', 'S', 'D', 'Z'...),
// 0 when there is no such process.
func quiesceProcState(t *testing.T, path string) byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ESRCH) {
		return 0
	}
	if err != nil {
		t.Fatal(err)
	}
	// pid (comm) state ...: comm may hold spaces and parentheses.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		t.Fatalf("%s: cannot parse %q", path, b)
	}
	return b[i+2]
}

// TestQuiesceCommandHang: a freeze command that hangs is killed at the
// timeout, with the child it started (no orphan survives), the guest is
// thawed, and a standard point is taken.
func TestQuiesceCommandHang(t *testing.T) {
	dir := t.TempDir()
	log := filepath.Join(dir, "log")
	cmd := quiesceScript(t, dir, "quiesce", fmt.Sprintf(`echo "$*" >> %[1]s/log
if [ "$2" = freeze ]; then
	echo $$ > %[1]s/leader.pid
	sleep 1000 &
	echo $! > %[1]s/child.pid
	wait
fi
`, dir))
	q := CommandQuiescer{Cmd: cmd, VM: "vm1"}

	// Long enough for the script to write its pid files on a loaded machine.
	const timeout = 1500 * time.Millisecond
	start := time.Now()
	var barrierCalls []bool
	_, ac, reason, err := QuiescedBarrier(t.Context(), q, timeout, func(ac bool) (int, error) {
		barrierCalls = append(barrierCalls, ac)
		return 0, nil
	})
	elapsed := time.Since(start)
	t.Logf("returned after %v: reason %v", elapsed, reason)
	if elapsed < timeout || elapsed > timeout+5*time.Second {
		t.Errorf("returned after %v, want about the timeout %v", elapsed, timeout)
	}
	if ac || err != nil || !slices.Equal(barrierCalls, []bool{false}) {
		t.Errorf("appConsistent %v, err %v, barrier calls %v; want false, nil, [false]", ac, err, barrierCalls)
	}
	if !errors.Is(reason, ErrQuiesce) || !errors.Is(reason, context.DeadlineExceeded) {
		t.Errorf("reason %v, want ErrQuiesce and DeadlineExceeded", reason)
	}
	if got, want := quiesceReadLines(t, log), []string{"vm1 freeze", "vm1 thaw"}; !slices.Equal(got, want) {
		t.Errorf("command ran %q, want %q", got, want)
	}
	for _, name := range []string{"leader.pid", "child.pid"} {
		lines := quiesceReadLines(t, filepath.Join(dir, name))
		pid, err := strconv.Atoi(lines[0])
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		// Killed: gone, or a zombie nobody reaped (PID 1 of a container may
		// not reap).
		stat := fmt.Sprintf("/proc/%d/stat", pid)
		quiesceWaitFor(t, 5*time.Second, fmt.Sprintf("%s %d dead", name, pid), func() bool {
			s := quiesceProcState(t, stat)
			return s == 0 || s == 'Z'
		})
	}
}

// quiesceAgent is a fake qemu-guest-agent: it serves the QGA JSON protocol
// on a unix socket, one client at a time as QEMU's chardev does.
type quiesceAgent struct {
	t      *testing.T
	socket string
	ln     net.Listener
	wg     sync.WaitGroup

	// stale: before each sync reply, send what an earlier client left
	// behind: a plain reply, a delimited sync reply with another id, an
	// error reply, and half a line.
	stale bool
	// answer gives the reply to a command; "" never answers.
	answer func(command string) string

	mu          sync.Mutex
	commands    []string // in the order received
	undelimited int      // guest-sync-delimited requests without a leading 0xFF
	frozen      bool
}

func newQuiesceAgent(t *testing.T, stale bool, answer func(command string) string) *quiesceAgent {
	a := &quiesceAgent{t: t, socket: filepath.Join(t.TempDir(), "qga.sock"), stale: stale, answer: answer}
	ln, err := net.Listen("unix", a.socket)
	if err != nil {
		t.Fatal(err)
	}
	a.ln = ln
	var conns sync.Map
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns.Store(c, true)
			a.serve(c) // one client at a time
			conns.Delete(c)
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		conns.Range(func(c, _ any) bool { c.(net.Conn).Close(); return true })
		a.wg.Wait()
	})
	return a
}

// quiesceAgentOK answers freeze and thaw with 2 filesystems.
func quiesceAgentOK(command string) string {
	switch command {
	case "guest-fsfreeze-freeze", "guest-fsfreeze-thaw":
		return `{"return": 2}`
	}
	return `{"error": {"class": "CommandNotFound", "desc": "The command ` + command + ` has not been found"}}`
}

func (a *quiesceAgent) serve(c net.Conn) {
	defer c.Close()
	r := bufio.NewReader(c)
	for {
		line, err := r.ReadBytes('\n')
		if err != nil {
			return
		}
		delimited := bytes.HasPrefix(line, []byte{0xFF})
		var req struct {
			Execute   string `json:"execute"`
			Arguments struct {
				ID int64 `json:"id"`
			} `json:"arguments"`
		}
		if err := json.Unmarshal(bytes.TrimLeft(line, "\xff"), &req); err != nil {
			a.t.Errorf("agent: bad request %q: %v", line, err)
			return
		}
		a.mu.Lock()
		a.commands = append(a.commands, req.Execute)
		reply := ""
		switch req.Execute {
		case "guest-sync-delimited":
			if !delimited {
				a.undelimited++
			}
			if a.stale {
				reply = fmt.Sprintf("{\"return\": 3}\n\xff{\"return\": %d}\n{\"error\": {\"class\": \"GenericError\", \"desc\": \"stale\"}}\n{\"retu",
					req.Arguments.ID+1)
			}
			reply += fmt.Sprintf("\xff{\"return\": %d}\n", req.Arguments.ID)
		default:
			if reply = a.answer(req.Execute); reply != "" {
				reply += "\n"
				switch {
				case req.Execute == "guest-fsfreeze-freeze" && strings.Contains(reply, "return"):
					a.frozen = true
				case req.Execute == "guest-fsfreeze-thaw":
					a.frozen = false
				}
			}
		}
		a.mu.Unlock()
		if reply != "" {
			if _, err := c.Write([]byte(reply)); err != nil {
				return
			}
		}
	}
}

func (a *quiesceAgent) state() (commands []string, undelimited int, frozen bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.commands), a.undelimited, a.frozen
}

// TestQuiesceQGA freezes and thaws through a fake agent that sends stale
// replies before each sync reply.
func TestQuiesceQGA(t *testing.T) {
	a := newQuiesceAgent(t, true, quiesceAgentOK)
	q := QGAQuiescer{Socket: a.socket}
	_, ac, reason, err := QuiescedBarrier(t.Context(), q, 10*time.Second, func(ac bool) (int, error) {
		if _, _, frozen := a.state(); !frozen {
			t.Errorf("barrier(%v) ran while the guest was not frozen", ac)
		}
		return 0, nil
	})
	if !ac || reason != nil || err != nil {
		t.Fatalf("QuiescedBarrier = %v, %v, %v; want true, nil, nil", ac, reason, err)
	}
	commands, undelimited, frozen := a.state()
	want := []string{"guest-sync-delimited", "guest-fsfreeze-freeze", "guest-sync-delimited", "guest-fsfreeze-thaw"}
	if !slices.Equal(commands, want) || undelimited != 0 || frozen {
		t.Errorf("agent got %q (%d syncs without 0xFF), frozen %v; want %q, 0, false", commands, undelimited, frozen, want)
	}
}

// TestQuiesceQGAErrors: an agent's error reply, and a freeze of no
// filesystem, are errors; the guest is thawed and a standard point taken.
func TestQuiesceQGAErrors(t *testing.T) {
	tests := []struct {
		name, reply  string
		class, desc  string // of the QGAError; "" when none
		thawCommands bool
	}{
		{name: "agent error",
			reply: `{"error": {"class": "GenericError", "desc": "failed to freeze /data: Device or resource busy"}}`,
			class: "GenericError", desc: "failed to freeze /data: Device or resource busy"},
		{name: "nothing frozen", reply: `{"return": 0}`},
		{name: "not an integer", reply: `{"return": {}}`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			a := newQuiesceAgent(t, false, func(command string) string {
				if command == "guest-fsfreeze-freeze" {
					return tc.reply
				}
				return quiesceAgentOK(command)
			})
			_, ac, reason, err := QuiescedBarrier(t.Context(), QGAQuiescer{Socket: a.socket}, 10*time.Second, func(ac bool) (int, error) {
				return 0, nil
			})
			t.Logf("reason: %v", reason)
			if ac || err != nil || !errors.Is(reason, ErrQuiesce) {
				t.Errorf("QuiescedBarrier = %v, %v, %v; want false, ErrQuiesce, nil", ac, reason, err)
			}
			var qerr *QGAError
			if got := errors.As(reason, &qerr); got != (tc.class != "") {
				t.Errorf("reason %v: QGAError %v, want %v", reason, got, tc.class != "")
			} else if got && (qerr.Class != tc.class || qerr.Desc != tc.desc || qerr.Command != "guest-fsfreeze-freeze") {
				t.Errorf("QGAError %+v, want class %q desc %q", *qerr, tc.class, tc.desc)
			}
			commands, _, _ := a.state()
			if want := []string{"guest-sync-delimited", "guest-fsfreeze-freeze", "guest-sync-delimited", "guest-fsfreeze-thaw"}; !slices.Equal(commands, want) {
				t.Errorf("agent got %q, want %q", commands, want)
			}
		})
	}
}

// TestQuiesceQGASilent: an agent that never answers makes Freeze give up at
// the context's deadline, in the sync or in the freeze itself; the guest is
// still thawed.
func TestQuiesceQGASilent(t *testing.T) {
	const timeout = 300 * time.Millisecond

	t.Run("sync", func(t *testing.T) {
		// An agent that reads and never answers, not even the sync.
		socket := filepath.Join(t.TempDir(), "qga.sock")
		ln, err := net.Listen("unix", socket)
		if err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := ln.Accept()
			if err != nil {
				return
			}
			io.Copy(io.Discard, c) // until the client hangs up
			c.Close()
		}()
		defer wg.Wait()
		defer ln.Close()

		// The clock starts before the deadline is set: the deadline counts
		// from the context's creation, so a later start reads short.
		start := time.Now()
		ctx, cancel := context.WithTimeout(t.Context(), timeout)
		defer cancel()
		err = QGAQuiescer{Socket: socket}.Freeze(ctx)
		elapsed := time.Since(start)
		if !errors.Is(err, ErrQuiesce) || !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "guest-sync-delimited") {
			t.Errorf("Freeze = %v, want a timed-out sync", err)
		}
		if elapsed < timeout || elapsed > timeout+5*time.Second {
			t.Errorf("Freeze returned after %v, want about %v", elapsed, timeout)
		}
	})

	t.Run("freeze", func(t *testing.T) {
		a := newQuiesceAgent(t, true, func(command string) string {
			if command == "guest-fsfreeze-freeze" {
				return ""
			}
			return quiesceAgentOK(command)
		})
		start := time.Now()
		var barrierCalls []bool
		_, ac, reason, err := QuiescedBarrier(t.Context(), QGAQuiescer{Socket: a.socket}, timeout, func(ac bool) (int, error) {
			barrierCalls = append(barrierCalls, ac)
			return 0, nil
		})
		elapsed := time.Since(start)
		t.Logf("returned after %v: reason %v", elapsed, reason)
		if ac || err != nil || !errors.Is(reason, context.DeadlineExceeded) || !slices.Equal(barrierCalls, []bool{false}) {
			t.Errorf("QuiescedBarrier = %v, %v, %v, barrier calls %v; want false, DeadlineExceeded, nil, [false]", ac, reason, err, barrierCalls)
		}
		if elapsed < timeout || elapsed > timeout+5*time.Second {
			t.Errorf("returned after %v, want about %v", elapsed, timeout)
		}
		commands, _, _ := a.state()
		if want := []string{"guest-sync-delimited", "guest-fsfreeze-freeze", "guest-sync-delimited", "guest-fsfreeze-thaw"}; !slices.Equal(commands, want) {
			t.Errorf("agent got %q, want %q", commands, want)
		}
	})
}

// quiesceNeed skips the test when a prerequisite is missing, unless CI is
// set: there every prerequisite must be present.
func quiesceNeed(t *testing.T, ok bool, what string) {
	t.Helper()
	if ok {
		return
	}
	if os.Getenv("CI") != "" {
		t.Fatalf("prerequisite missing under CI: %s", what)
	}
	t.Skipf("prerequisite missing: %s (with CI set this fails)", what)
}

func quiesceRun(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(string(out))
}

// TestQuiesceFsfreezeExt4 quiesces a real ext4 on a loop device with
// fsfreeze through CommandQuiescer: a write started while frozen blocks in
// the kernel until the thaw.
func TestQuiesceFsfreezeExt4(t *testing.T) {
	quiesceNeed(t, os.Geteuid() == 0, "root (losetup, mount, fsfreeze)")
	for _, tool := range []string{"fsfreeze", "mkfs.ext4", "losetup", "mount", "umount"} {
		_, err := exec.LookPath(tool)
		quiesceNeed(t, err == nil, tool)
	}

	dir := t.TempDir()
	img := filepath.Join(dir, "fs.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 32<<20); err != nil {
		t.Fatal(err)
	}
	loop := quiesceRun(t, "losetup", "--find", "--show", img)
	t.Cleanup(func() { quiesceRun(t, "losetup", "-d", loop) })
	quiesceRun(t, "mkfs.ext4", "-q", loop)
	mnt := t.TempDir()
	quiesceRun(t, "mount", loop, mnt)
	t.Cleanup(func() { quiesceRun(t, "umount", mnt) })
	// Whatever happens, never leave it frozen (fails harmlessly when not).
	t.Cleanup(func() { exec.Command("fsfreeze", "-u", mnt).Run() })

	if err := os.WriteFile(filepath.Join(mnt, "before"), []byte("before"), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := quiesceScript(t, dir, "quiesce", `case "$3" in
freeze) exec fsfreeze -f "$1" ;;
thaw) exec fsfreeze -u "$1" ;;
*) echo "unknown action $3" >&2; exit 2 ;;
esac
`)
	q := CommandQuiescer{Cmd: cmd, Args: []string{mnt}, VM: "vm1"}

	f, err := os.Create(filepath.Join(mnt, "during"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	payload := []byte("written while frozen")
	tids := make(chan int, 1)
	done := make(chan error, 1)
	_, ac, reason, err := QuiescedBarrier(t.Context(), q, 10*time.Second, func(ac bool) (int, error) {
		if !ac {
			t.Errorf("barrier(false): the freeze failed")
			return 0, nil
		}
		go func() {
			runtime.LockOSThread() // the thread dies with the goroutine
			tids <- syscall.Gettid()
			_, err := f.Write(payload)
			done <- err
		}()
		// Wait until the writer sleeps in the kernel on the frozen
		// superblock's write lock (sb_start_write: a percpu rwsem).
		stack := fmt.Sprintf("/proc/self/task/%d/stack", <-tids)
		var last []byte
		quiesceWaitFor(t, 10*time.Second, "writer blocked by the freeze", func() bool {
			select {
			case err := <-done:
				t.Fatalf("a write completed while frozen (err %v)", err)
			default:
			}
			b, err := os.ReadFile(stack)
			if errors.Is(err, os.ErrNotExist) {
				return false // the writer is done: the next round says so
			}
			if err != nil {
				t.Fatalf("%s: %v", stack, err)
			}
			last = b
			return bytes.Contains(b, []byte("percpu_rwsem"))
		})
		t.Logf("writer's kernel stack while frozen:\n%s", last)
		select {
		case err := <-done:
			t.Errorf("a write completed while frozen (err %v)", err)
		default:
		}
		return 1, nil
	})
	if !ac || reason != nil || err != nil {
		t.Fatalf("QuiescedBarrier = %v, %v, %v; want true, nil, nil", ac, reason, err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("write after thaw: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("write still blocked 10s after the thaw")
	}
	if got, err := os.ReadFile(filepath.Join(mnt, "during")); err != nil || !bytes.Equal(got, payload) {
		t.Errorf("file written across the thaw holds %q (%v), want %q", got, err, payload)
	}
}
