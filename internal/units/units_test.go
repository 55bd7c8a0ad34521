package units

import (
	"math"
	"testing"
)

func TestFormatBytes(t *testing.T) {
	for _, tc := range []struct {
		n    int64
		want string
	}{
		{0, "0 B"},
		{1, "1 B"},
		{1023, "1023 B"},
		{1024, "1.0 KiB"},
		{1536, "1.5 KiB"},
		{1 << 20, "1.0 MiB"},
		{8 << 20, "8.0 MiB"},
		{1<<20 - 1, "1.0 MiB"}, // was "1024.0 KiB"
		{1<<30 - 1, "1.0 GiB"}, // was "1024.0 MiB" (doctor, issue 15)
		{1<<30 - 1<<20, "1023.0 MiB"},
		{1<<30 - 50<<10, "1.0 GiB"}, // 1023.95 MiB rounds up to 1024.0: next unit
		{1<<30 - 60<<10, "1023.9 MiB"},
		{1 << 30, "1.0 GiB"},
		{4 << 30, "4.0 GiB"},
		{3435973837, "3.2 GiB"},
		{1 << 40, "1.0 TiB"},
		{1 << 50, "1.0 PiB"},
		{1 << 60, "1.0 EiB"},
		{math.MaxInt64, "8.0 EiB"},
		{-1536, "-1.5 KiB"},
		{math.MinInt64, "-8.0 EiB"},
	} {
		if got := FormatBytes(tc.n); got != tc.want {
			t.Errorf("FormatBytes(%d) = %q, want %q", tc.n, got, tc.want)
		}
	}
}
