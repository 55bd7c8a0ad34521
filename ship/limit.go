package ship

import (
	"context"
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"

	"golang.org/x/time/rate"
)

// Window is a daily time window in local time, "HH:MM-HH:MM". It may wrap
// midnight ("18:30-06:00" is the evening and the night); equal ends, such as
// "00:00-00:00" or "00:00-24:00", mean the whole day.
type Window struct {
	From, To int // minutes after midnight, 0..1440
}

// ParseWindow parses "HH:MM-HH:MM".
func ParseWindow(s string) (Window, error) {
	from, to, ok := strings.Cut(strings.TrimSpace(s), "-")
	if !ok {
		return Window{}, fmt.Errorf("%w: window %q: want HH:MM-HH:MM", ErrBadConfig, s)
	}
	f, err := parseClock(from)
	if err != nil {
		return Window{}, fmt.Errorf("%w: window %q: %v", ErrBadConfig, s, err)
	}
	t, err := parseClock(to)
	if err != nil {
		return Window{}, fmt.Errorf("%w: window %q: %v", ErrBadConfig, s, err)
	}
	return Window{From: f, To: t}, nil
}

func parseClock(s string) (int, error) {
	h, m, ok := strings.Cut(strings.TrimSpace(s), ":")
	if !ok || len(h) < 1 || len(h) > 2 || len(m) != 2 {
		return 0, fmt.Errorf("%q is not HH:MM", s)
	}
	hh, err1 := strconv.Atoi(h)
	mm, err2 := strconv.Atoi(m)
	if err1 != nil || err2 != nil || hh < 0 || mm < 0 || mm > 59 || hh > 24 || (hh == 24 && mm != 0) {
		return 0, fmt.Errorf("%q is not a time of day", s)
	}
	return hh*60 + mm, nil
}

func (w Window) String() string {
	return fmt.Sprintf("%02d:%02d-%02d:%02d", w.From/60, w.From%60, w.To/60, w.To%60)
}

func (w Window) allDay() bool { return w.From%1440 == w.To%1440 }

// Contains says whether t (in its own location) lies inside the window.
func (w Window) Contains(t time.Time) bool {
	if w.allDay() {
		return true
	}
	m := t.Hour()*60 + t.Minute()
	if w.From < w.To {
		return m >= w.From && m < w.To
	}
	return m >= w.From || m < w.To
}

// Next is t when t is inside the window, else the next time the window opens.
func (w Window) Next(t time.Time) time.Time {
	if w.Contains(t) {
		return t
	}
	y, mo, d := t.Date()
	start := time.Date(y, mo, d, w.From/60, w.From%60, 0, 0, t.Location())
	if !start.After(t) {
		start = time.Date(y, mo, d+1, w.From/60, w.From%60, 0, 0, t.Location())
	}
	return start
}

// Limiter paces bytes on the wire by a bandwidth schedule. The zero of a
// *Limiter (nil) is unlimited. A Limiter is safe for concurrent use, so one
// can be shared by every VM of a host.
type Limiter struct {
	// Now picks the schedule rule that applies; nil means time.Now. The pace
	// itself is kept by the real clock.
	Now func() time.Time

	spec  string
	rules []bandwidthRule // fixed after ParseBandwidth
}

type bandwidthRule struct {
	win *Window // nil: any time ("*")
	bps float64 // bytes per second; +Inf unlimited
	lim *rate.Limiter
}

// ParseBandwidth parses a bandwidth or a schedule of them:
//
//	unlimited
//	50MB/s          (B, KB, MB, GB, TB: powers of 1000; KiB, MiB, GiB, TiB)
//	100Mbit/s       (bit, Kbit, Mbit, Gbit: bits)
//	08:00-18:00=20MB/s,*=unlimited
//
// In a schedule the first rule whose window holds the current local time
// applies; "*" holds any time; no match is unlimited.
func ParseBandwidth(s string) (*Limiter, error) {
	l := &Limiter{spec: strings.TrimSpace(s)}
	if l.spec == "" {
		return nil, fmt.Errorf("%w: empty bandwidth", ErrBadConfig)
	}
	for _, part := range strings.Split(l.spec, ",") {
		part = strings.TrimSpace(part)
		when, what, hasWhen := strings.Cut(part, "=")
		if !hasWhen {
			when, what = "*", part
		}
		var r bandwidthRule
		if w := strings.TrimSpace(when); w != "*" {
			win, err := ParseWindow(w)
			if err != nil {
				return nil, fmt.Errorf("%w: bandwidth %q: %v", ErrBadConfig, s, err)
			}
			r.win = &win
		}
		bps, err := parseRate(what)
		if err != nil {
			return nil, fmt.Errorf("%w: bandwidth %q: %v", ErrBadConfig, s, err)
		}
		r.bps = bps
		if !math.IsInf(bps, 1) {
			r.lim = rate.NewLimiter(rate.Limit(bps), burstFor(bps))
		}
		l.rules = append(l.rules, r)
	}
	return l, nil
}

// burstFor allows a tenth of a second of traffic at once, at least 16 KiB so
// a slow link still moves whole TLS records, at most 4 MiB.
func burstFor(bps float64) int {
	return int(min(max(bps/10, 16<<10), 4<<20))
}

var rateUnits = map[string]float64{
	"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
	"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
	"bit": 1.0 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8,
}

// parseRate parses "50MB/s" into bytes per second; "unlimited" is +Inf.
func parseRate(s string) (float64, error) {
	s = strings.TrimSpace(s)
	if strings.EqualFold(s, "unlimited") {
		return math.Inf(1), nil
	}
	num, ok := strings.CutSuffix(s, "/s")
	if !ok {
		return 0, fmt.Errorf("rate %q: want a number and a unit per second, such as 50MB/s", s)
	}
	i := strings.IndexFunc(num, func(r rune) bool { return (r < '0' || r > '9') && r != '.' })
	if i <= 0 {
		return 0, fmt.Errorf("rate %q: want a number and a unit per second, such as 50MB/s", s)
	}
	unit := num[i:]
	// "Mb" could be bits or bytes: make the admin say which.
	if strings.HasSuffix(unit, "b") && !strings.HasSuffix(strings.ToLower(unit), "bit") {
		return 0, fmt.Errorf("rate %q: write %sbit/s for bits or %sB/s for bytes", s, strings.TrimSuffix(unit, "b"), strings.TrimSuffix(unit, "b"))
	}
	mult, ok := rateUnits[strings.ToLower(unit)]
	if !ok {
		return 0, fmt.Errorf("rate %q: unknown unit %q", s, unit)
	}
	v, err := strconv.ParseFloat(num[:i], 64)
	if err != nil || v <= 0 || math.IsInf(v, 0) {
		return 0, fmt.Errorf("rate %q: want a positive number", s)
	}
	return v * mult, nil
}

// String is the schedule as parsed.
func (l *Limiter) String() string {
	if l == nil {
		return "unlimited"
	}
	return l.spec
}

func (l *Limiter) rule(t time.Time) *bandwidthRule {
	for i := range l.rules {
		if r := &l.rules[i]; r.win == nil || r.win.Contains(t) {
			return r
		}
	}
	return nil
}

// Rate is the rate in bytes per second that applies at t; +Inf is unlimited.
func (l *Limiter) Rate(t time.Time) float64 {
	if l == nil {
		return math.Inf(1)
	}
	if r := l.rule(t); r != nil {
		return r.bps
	}
	return math.Inf(1)
}

// WaitN blocks until n more bytes may be sent under the rate that applies
// now, or ctx ends.
func (l *Limiter) WaitN(ctx context.Context, n int) error {
	if l == nil || n <= 0 {
		return nil
	}
	now := time.Now
	if l.Now != nil {
		now = l.Now
	}
	r := l.rule(now())
	if r == nil || r.lim == nil {
		return nil
	}
	for n > 0 {
		k := min(n, r.lim.Burst())
		if err := r.lim.WaitN(ctx, k); err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("ship: bandwidth limit: %w", err)
		}
		n -= k
	}
	return nil
}
