package quiesce

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os/exec"
	"strings"
	"syscall"
	"time"
)

// ErrQuiesce wraps every freeze failure (and every thaw failure).
var ErrQuiesce = errors.New("quiesce: failed")

// Quiescer freezes a guest's filesystems so a cycle barrier taken while frozen
// is application-consistent, and thaws them again.
//
// Freeze and Thaw must return soon after ctx ends. Thaw of a guest that is
// not frozen must succeed (or fail harmlessly): QuiescedBarrier thaws after
// every failed freeze.
type Quiescer interface {
	Freeze(ctx context.Context) error
	Thaw(ctx context.Context) error
}

// QuiescedBarrier freezes the guest through q (giving up after timeout),
// calls barrier(true) while frozen, and thaws.
//
// When the freeze fails or times out it thaws anyway (a timed-out freeze may
// have half-succeeded), then calls barrier(false) and returns the barrier's
// result with appConsistent false and a reason saying what failed. A
// non-positive timeout is such a failure (nothing is frozen).
//
// barrier is called exactly once, on the calling goroutine, with true
// exactly when the guest was frozen; appConsistent is the value it was
// called with. result and err are what barrier returned: err is the
// barrier's own error, never a quiesce problem. reason, when not nil, is the
// quiesce problem (wrapping ErrQuiesce): the freeze failure (and the thaw
// failure after it, if any) when appConsistent is false; a thaw failure
// after the frozen barrier when appConsistent is true (the point is still
// application-consistent; the guest may still be frozen).
//
// Thaw runs with its own timeout, detached from ctx's cancellation, so the
// guest is thawed even when ctx is cancelled; it also runs when barrier
// panics. The guest is never left frozen by this call longer than timeout +
// the barrier's own time + timeout, provided q honours its contexts.
func QuiescedBarrier[T any](ctx context.Context, q Quiescer, timeout time.Duration, barrier func(appConsistent bool) (T, error)) (result T, appConsistent bool, reason error, err error) {
	if timeout <= 0 {
		reason = fmt.Errorf("%w: freeze timeout %v is not positive", ErrQuiesce, timeout)
		result, err = barrier(false)
		return result, false, reason, err
	}

	fctx, cancel := context.WithTimeout(ctx, timeout)
	ferr := q.Freeze(fctx)
	cancel()
	if ferr != nil {
		reason = asQuiesceErr("freeze", ferr)
		if terr := thaw(ctx, q, timeout); terr != nil {
			reason = fmt.Errorf("%w; thaw after it: %w", reason, terr)
		}
		result, err = barrier(false)
		return result, false, reason, err
	}

	thawed := false
	defer func() {
		if !thawed { // barrier panicked or called runtime.Goexit
			_ = thaw(ctx, q, timeout) // nowhere to report it: the panic goes on
		}
	}()
	result, err = barrier(true)
	thawed = true
	reason = thaw(ctx, q, timeout)
	return result, true, reason, err
}

// thaw thaws with its own timeout, even when ctx is already cancelled.
func thaw(ctx context.Context, q Quiescer, timeout time.Duration) error {
	tctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), timeout)
	defer cancel()
	if err := q.Thaw(tctx); err != nil {
		return asQuiesceErr("thaw", err)
	}
	return nil
}

// asQuiesceErr wraps err in ErrQuiesce unless it already is (the Quiescers
// of this file wrap their errors and name the step themselves).
func asQuiesceErr(step string, err error) error {
	if errors.Is(err, ErrQuiesce) {
		return err
	}
	return fmt.Errorf("%w: %s: %w", ErrQuiesce, step, err)
}

// commandWaitDelay bounds how long a quiesce command's output is still read
// after the command was killed or exited: a process that left the command's
// process group may hold the pipes open for ever.
const commandWaitDelay = time.Second

// commandOutputLimit is how much of each of a quiesce command's standard
// output and error is kept for the error message.
const commandOutputLimit = 4096

// CommandQuiescer runs `CMD VM freeze` and `CMD VM thaw` (CMD split like a shell
// would NOT be done: CMD is one executable path; Args are extra leading args).
// The full command line is Cmd, Args..., VM, "freeze" or "thaw".
//
// QuiescedBarrier runs the thaw after a failed freeze too, so the command
// should thaw successfully when nothing is frozen; if it fails instead
// (`fsfreeze -u` on a filesystem that is not frozen says "Invalid
// argument"), that failure is only added to the freeze's reason.
type CommandQuiescer struct {
	Cmd  string
	Args []string
	VM   string
}

// Freeze runs `Cmd Args... VM freeze`.
func (q CommandQuiescer) Freeze(ctx context.Context) error { return q.run(ctx, "freeze") }

// Thaw runs `Cmd Args... VM thaw`.
func (q CommandQuiescer) Thaw(ctx context.Context) error { return q.run(ctx, "thaw") }

func (q CommandQuiescer) run(ctx context.Context, action string) error {
	args := append(append(append([]string(nil), q.Args...), q.VM), action)
	desc := strings.Join(append([]string{q.Cmd}, args...), " ")
	if q.Cmd == "" {
		return fmt.Errorf("%w: %s: no quiesce command", ErrQuiesce, action)
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("%w: %q: not started: %w", ErrQuiesce, desc, err)
	}

	cmd := exec.CommandContext(ctx, q.Cmd, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error {
		// The group's id is the leader's pid; the leader is not reaped yet
		// (Wait has not returned), so the id still names this group.
		err := syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		if errors.Is(err, syscall.ESRCH) {
			return nil
		}
		return err
	}
	cmd.WaitDelay = commandWaitDelay
	var stdout, stderr limitedBuffer
	stdout.limit, stderr.limit = commandOutputLimit, commandOutputLimit
	cmd.Stdout, cmd.Stderr = &stdout, &stderr

	err := cmd.Run()
	if errors.Is(err, exec.ErrWaitDelay) && cmd.ProcessState != nil && cmd.ProcessState.Success() {
		// The command said it succeeded; something it left behind kept
		// the output pipes open. The exit status is the command's verdict.
		err = nil
	}
	if err == nil {
		return nil
	}
	msg := firstLine(stderr.Bytes())
	if msg == "" {
		msg = firstLine(stdout.Bytes())
	}
	if msg != "" {
		msg = ": " + msg
	}
	if cerr := ctx.Err(); cerr != nil {
		return fmt.Errorf("%w: %q: killed: %w%s", ErrQuiesce, desc, cerr, msg)
	}
	return fmt.Errorf("%w: %q: %w%s", ErrQuiesce, desc, err, msg)
}

// firstLine is the first non-blank line of b, trimmed.
func firstLine(b []byte) string {
	for line := range bytes.Lines(b) {
		if s := strings.TrimSpace(string(line)); s != "" {
			return s
		}
	}
	return ""
}

// limitedBuffer keeps the first limit bytes written to it and drops the
// rest (reporting them written, so the command never sees a broken pipe).
type limitedBuffer struct {
	bytes.Buffer
	limit int
}

func (b *limitedBuffer) Write(p []byte) (int, error) {
	if room := b.limit - b.Len(); room > 0 {
		b.Buffer.Write(p[:min(room, len(p))])
	}
	return len(p), nil
}

// QGAQuiescer talks to a qemu-guest-agent unix socket (the chardev socket
// QEMU exposes for the virtio-serial org.qemu.guest_agent.0 port):
// guest-sync-delimited with a random id, discarding stale replies until the
// id matches, then guest-fsfreeze-freeze / guest-fsfreeze-thaw. Error replies
// from the agent are returned as *QGAError (wrapped in ErrQuiesce).
type QGAQuiescer struct {
	Socket string
}

// QGAError is an error reply of the guest agent.
type QGAError struct {
	Command string // the request it answers
	Class   string // e.g. "GenericError", "CommandNotFound"
	Desc    string
}

func (e *QGAError) Error() string {
	return fmt.Sprintf("%s: agent replied %s: %s", e.Command, e.Class, e.Desc)
}

// qgaReplyLimit bounds one reply line of the agent.
const qgaReplyLimit = 64 << 10

// Freeze runs guest-fsfreeze-freeze; a freeze of no filesystem is an error.
func (q QGAQuiescer) Freeze(ctx context.Context) error {
	n, err := q.call(ctx, "guest-fsfreeze-freeze")
	if err != nil {
		return err
	}
	if n <= 0 {
		return fmt.Errorf("%w: qemu-guest-agent %s: guest-fsfreeze-freeze froze %d filesystems", ErrQuiesce, q.Socket, n)
	}
	return nil
}

// Thaw runs guest-fsfreeze-thaw (which thaws nothing, successfully, when the
// guest is not frozen).
func (q QGAQuiescer) Thaw(ctx context.Context) error {
	_, err := q.call(ctx, "guest-fsfreeze-thaw")
	return err
}

type qgaRequest struct {
	Execute   string `json:"execute"`
	Arguments any    `json:"arguments,omitempty"`
}

type qgaReply struct {
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error"`
}

// call connects, synchronises and runs command, whose reply must be an
// integer.
func (q QGAQuiescer) call(ctx context.Context, command string) (int64, error) {
	step := "connect"
	fail := func(err error) (int64, error) {
		if cerr := ctx.Err(); cerr != nil {
			err = cerr // the deadline cut the connection: say so
		}
		return 0, fmt.Errorf("%w: qemu-guest-agent %s: %s: %w", ErrQuiesce, q.Socket, step, err)
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", q.Socket)
	if err != nil {
		return fail(err)
	}
	defer conn.Close()
	// Cut reads and writes when ctx ends.
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	r := bufio.NewReader(conn)

	step = "guest-sync-delimited"
	id := rand.Int64N(1 << 53) // exact in any JSON implementation
	if err := qgaSend(conn, true, qgaRequest{Execute: step, Arguments: map[string]int64{"id": id}}); err != nil {
		return fail(err)
	}
	for synced := false; !synced; {
		if err := qgaSkipToDelimiter(r); err != nil {
			return fail(err)
		}
		line, err := qgaReadLine(r)
		if err != nil {
			return fail(err)
		}
		var rep qgaReply
		var got int64
		synced = json.Unmarshal(line, &rep) == nil && rep.Error == nil &&
			json.Unmarshal(rep.Return, &got) == nil && got == id
		// Anything else is a stale reply of an earlier client.
	}

	step = command
	if err := qgaSend(conn, false, qgaRequest{Execute: command}); err != nil {
		return fail(err)
	}
	var line []byte
	for len(line) == 0 {
		if line, err = qgaReadLine(r); err != nil {
			return fail(err)
		}
		line = bytes.TrimSpace(bytes.TrimLeft(line, "\xff"))
	}
	var rep qgaReply
	if err := json.Unmarshal(line, &rep); err != nil {
		return fail(fmt.Errorf("malformed reply %.100q: %w", line, err))
	}
	if rep.Error != nil {
		return 0, fmt.Errorf("%w: qemu-guest-agent %s: %w", ErrQuiesce, q.Socket,
			&QGAError{Command: command, Class: rep.Error.Class, Desc: rep.Error.Desc})
	}
	var n int64
	if err := json.Unmarshal(rep.Return, &n); err != nil {
		return fail(fmt.Errorf("reply %.100q has no integer return: %w", line, err))
	}
	return n, nil
}

// qgaSend writes one request, after a 0xFF when delimit is set.
func qgaSend(conn net.Conn, delimit bool, req qgaRequest) error {
	b, err := json.Marshal(req)
	if err != nil {
		return err
	}
	if delimit {
		b = append([]byte{0xFF}, b...)
	}
	_, err = conn.Write(append(b, '\n'))
	return err
}

// qgaSkipToDelimiter discards input up to and including the next 0xFF.
func qgaSkipToDelimiter(r *bufio.Reader) error {
	for {
		_, err := r.ReadSlice(0xFF)
		if err == nil {
			return nil
		}
		if !errors.Is(err, bufio.ErrBufferFull) {
			return err
		}
	}
}

// qgaReadLine reads up to and including the next "\n", at most
// qgaReplyLimit bytes.
func qgaReadLine(r *bufio.Reader) ([]byte, error) {
	var line []byte
	for {
		part, err := r.ReadSlice('\n')
		line = append(line, part...)
		if len(line) > qgaReplyLimit {
			return nil, fmt.Errorf("reply longer than %d bytes", qgaReplyLimit)
		}
		if err == nil {
			return line, nil
		}
		if !errors.Is(err, bufio.ErrBufferFull) {
			return nil, err
		}
	}
}
