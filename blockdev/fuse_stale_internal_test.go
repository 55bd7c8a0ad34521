package blockdev

import (
	"slices"
	"testing"
)

func TestParseMountInfo(t *testing.T) {
	const text = `22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
36 22 0:35 / /mnt/a\040b rw,nosuid,nodev,relatime shared:7 master:3 - fuse.vdrepl vdrepl rw,user_id=0,group_id=0
37 22 0:36 / /mnt/x rw - fuse.other otherfs rw
38 37 0:37 / /mnt/x rw - fuse.vdrepl vdrepl rw
short line
`
	got := parseMountInfo(text)
	want := []mountInfo{
		{"/", "ext4", "/dev/sda1"},
		{"/mnt/a b", "fuse.vdrepl", "vdrepl"},
		{"/mnt/x", "fuse.other", "otherfs"},
		{"/mnt/x", "fuse.vdrepl", "vdrepl"},
	}
	if !slices.Equal(got, want) {
		t.Fatalf("parseMountInfo:\n got %v\nwant %v", got, want)
	}
	for _, tc := range []struct {
		mp    string
		found bool
		ours  bool
	}{
		{"/mnt/a b", true, true},
		{"/mnt/x", true, true}, // the last listed is on top
		{"/", true, false},
		{"/nowhere", false, false},
	} {
		m, found := topMount(got, tc.mp)
		if found != tc.found || m.isOurs() != tc.ours {
			t.Errorf("topMount(%q) = %v, %v; ours %v; want found %v ours %v", tc.mp, m, found, m.isOurs(), tc.found, tc.ours)
		}
	}
}
