// Package units renders byte counts for people, the one way every command
// and check of vdrepl prints a size ("512 B", "1.0 GiB"). Scripts read the
// exact counts from --json; this text is for eyes only. It imports nothing
// of vdrepl's and is safe for concurrent use.
package units

import "fmt"

// FormatBytes renders n bytes in binary units with one decimal: "512 B",
// "4.0 KiB", "3.2 GiB". The unit is chosen after rounding, so a count just
// below a boundary reads "1.0 GiB", never "1024.0 MiB". Negative counts keep
// their sign.
func FormatBytes(n int64) string {
	if n < 0 {
		if n == -n { // math.MinInt64 has no positive twin
			return "-8.0 EiB"
		}
		return "-" + FormatBytes(-n)
	}
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	v, exp := float64(n)/unit, 0
	// Move up while the value would print as 1024.0 or more at one decimal.
	for v >= unit-0.05 && exp < len(prefixes)-1 {
		v /= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", v, prefixes[exp])
}

const prefixes = "KMGTPE"
