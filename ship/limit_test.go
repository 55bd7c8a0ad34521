package ship

import (
	"context"
	"errors"
	"math"
	"testing"
	"time"
)

func TestParseBandwidth(t *testing.T) {
	for _, tc := range []struct {
		spec string
		want float64 // bytes per second at 12:00, +Inf unlimited
		bad  bool
	}{
		{spec: "unlimited", want: math.Inf(1)},
		{spec: "50MB/s", want: 50e6},
		{spec: "1.5GB/s", want: 1.5e9},
		{spec: "100Mbit/s", want: 12.5e6},
		{spec: "1Gbit/s", want: 125e6},
		{spec: "64KiB/s", want: 65536},
		{spec: "10MiB/s", want: 10 << 20},
		{spec: "800B/s", want: 800},
		{spec: "08:00-18:00=20MB/s,*=unlimited", want: 20e6},
		{spec: "18:00-08:00=20MB/s,*=5MB/s", want: 5e6},
		{spec: "18:00-08:00=20MB/s", want: math.Inf(1)},
		{spec: " 08:00-18:00 = 20MB/s , * = 1MB/s ", want: 20e6},
		{spec: "", bad: true},
		{spec: "50", bad: true},
		{spec: "50MB", bad: true},
		{spec: "50Mb/s", bad: true}, // bits or bytes?
		{spec: "-5MB/s", bad: true},
		{spec: "0MB/s", bad: true},
		{spec: "5XB/s", bad: true},
		{spec: "8-18=5MB/s", bad: true},
		{spec: "08:00-18:00=fast", bad: true},
	} {
		l, err := ParseBandwidth(tc.spec)
		if tc.bad {
			if !errors.Is(err, ErrBadConfig) {
				t.Errorf("%q: err %v, want ErrBadConfig", tc.spec, err)
			}
			continue
		}
		if err != nil {
			t.Errorf("%q: %v", tc.spec, err)
			continue
		}
		if got := l.Rate(time.Date(2026, 1, 1, 12, 0, 0, 0, time.Local)); got != tc.want {
			t.Errorf("%q at noon: %v B/s, want %v", tc.spec, got, tc.want)
		}
	}
}

func TestLimiterPicksRateByTime(t *testing.T) {
	l, err := ParseBandwidth("08:00-18:00=20MB/s,18:00-23:00=50MB/s,*=unlimited")
	if err != nil {
		t.Fatal(err)
	}
	day := func(h, m int) time.Time { return time.Date(2026, 1, 1, h, m, 0, 0, time.Local) }
	for _, tc := range []struct {
		at   time.Time
		want float64
	}{
		{day(7, 59), math.Inf(1)},
		{day(8, 0), 20e6},
		{day(17, 59), 20e6},
		{day(18, 0), 50e6},
		{day(22, 59), 50e6},
		{day(23, 0), math.Inf(1)},
		{day(3, 0), math.Inf(1)},
	} {
		if got := l.Rate(tc.at); got != tc.want {
			t.Errorf("at %s: %v, want %v", tc.at.Format("15:04"), got, tc.want)
		}
	}
	var none *Limiter
	if !math.IsInf(none.Rate(day(12, 0)), 1) || none.WaitN(context.Background(), 1<<30) != nil {
		t.Fatal("a nil Limiter is not unlimited")
	}
}

func TestLimiterWaitN(t *testing.T) {
	// 1 MB/s in the day, unlimited at night; the clock says which.
	l, err := ParseBandwidth("06:00-22:00=1MB/s,*=unlimited")
	if err != nil {
		t.Fatal(err)
	}
	clock := newClock(time.Date(2026, 1, 1, 23, 0, 0, 0, time.Local))
	l.Now = clock.Now
	ctx := context.Background()
	start := time.Now()
	if err := l.WaitN(ctx, 100<<20); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("100 MB at night took %v", d)
	}
	clock.Set(time.Date(2026, 1, 1, 12, 0, 0, 0, time.Local))
	start = time.Now()
	// The burst (100 KB) goes at once, the rest at 1 MB/s: at least 0.2s.
	if err := l.WaitN(ctx, 300_000); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d < 190*time.Millisecond {
		t.Fatalf("300 KB at 1 MB/s took only %v", d)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if err := l.WaitN(cctx, 10<<20); err == nil {
		t.Fatal("WaitN ignored a canceled context")
	}
}

func TestWindow(t *testing.T) {
	at := func(d, h, m int) time.Time { return time.Date(2026, 1, d, h, m, 0, 0, time.Local) }
	for _, tc := range []struct {
		spec string
		at   time.Time
		in   bool
		next time.Time
	}{
		{"18:30-06:00", at(1, 12, 0), false, at(1, 18, 30)},
		{"18:30-06:00", at(1, 18, 30), true, at(1, 18, 30)},
		{"18:30-06:00", at(1, 23, 59), true, at(1, 23, 59)},
		{"18:30-06:00", at(2, 5, 59), true, at(2, 5, 59)},
		{"18:30-06:00", at(2, 6, 0), false, at(2, 18, 30)},
		{"01:00-05:00", at(1, 6, 0), false, at(2, 1, 0)},
		{"01:00-05:00", at(1, 0, 30), false, at(1, 1, 0)},
		{"01:00-05:00", at(1, 3, 0), true, at(1, 3, 0)},
		{"00:00-24:00", at(1, 13, 0), true, at(1, 13, 0)},
		{"00:00-00:00", at(1, 13, 0), true, at(1, 13, 0)},
		{"9:00-17:00", at(1, 9, 0), true, at(1, 9, 0)},
	} {
		w, err := ParseWindow(tc.spec)
		if err != nil {
			t.Errorf("%q: %v", tc.spec, err)
			continue
		}
		if got := w.Contains(tc.at); got != tc.in {
			t.Errorf("%q contains %s: %v", tc.spec, tc.at.Format("15:04"), got)
		}
		if got := w.Next(tc.at); !got.Equal(tc.next) {
			t.Errorf("%q next after %s: %s, want %s", tc.spec, tc.at, got, tc.next)
		}
	}
	for _, bad := range []string{"", "18:30", "18:30-", "24:01-01:00", "12:60-13:00", "ab:cd-01:00", "1800-0600", "18:30-06:00-07:00"} {
		if _, err := ParseWindow(bad); !errors.Is(err, ErrBadConfig) {
			t.Errorf("%q: %v, want ErrBadConfig", bad, err)
		}
	}
}

func TestChunkForSlowLinks(t *testing.T) {
	now := time.Now()
	lim := func(s string) *Limiter {
		l, err := ParseBandwidth(s)
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	for _, c := range []struct {
		lims []*Limiter
		want int64
	}{
		{nil, 8 << 20},
		{[]*Limiter{nil, lim("unlimited")}, 8 << 20},
		{[]*Limiter{lim("100MB/s")}, 8 << 20},
		{[]*Limiter{lim("50KB/s"), nil}, 50000 * 120 &^ 4095},
		{[]*Limiter{lim("100MB/s"), lim("1KB/s")}, 120000 &^ 4095},
		{[]*Limiter{lim("0.1KB/s")}, 64 << 10},
	} {
		if got := chunkFor(8<<20, c.lims, now); got != c.want {
			t.Errorf("chunkFor(%v) = %d, want %d", c.lims, got, c.want)
		}
	}
}
