package blockdev

// Stale mounts. When the process serving a FUSE mount dies (a daemon
// crash, kill -9), the kernel keeps the mount with its connection aborted:
// every access to the mount point fails with ENOTCONN until someone
// unmounts it. MountFUSE clears such a mount when it is one of ours
// (fs type fuse.vdrepl, source vdrepl, as fuseMountOptions set them) by
// detaching it lazily (umount2 MNT_DETACH, or fusermount3 -uz when not
// root), then mounts afresh. A stale mount of another file system is left
// alone: MountFUSE fails with ErrStaleMount naming it.

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

const (
	// fuseFsName and fuseSubtype are what a vdrepl mount shows in
	// /proc/self/mountinfo as its source and (after "fuse.") its type.
	fuseFsName  = "vdrepl"
	fuseSubtype = "vdrepl"
)

// ErrStaleMount: the mount point is a FUSE mount whose server is gone
// (ENOTCONN) and it is not a vdrepl mount, so it is not ours to detach.
var ErrStaleMount = errors.New("blockdev: stale mount of another file system")

// mountInfo is one line of /proc/self/mountinfo, as far as we use it.
type mountInfo struct {
	Mountpoint string
	FSType     string
	Source     string
}

// parseMountInfo reads mountinfo lines (proc(5)): the mount point is the
// fifth field, octal-escaped; after the "-" separator come the fs type and
// the source.
func parseMountInfo(text string) []mountInfo {
	var out []mountInfo
	sc := bufio.NewScanner(strings.NewReader(text))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		sep := -1
		for i := 6; i < len(f); i++ {
			if f[i] == "-" {
				sep = i
				break
			}
		}
		if len(f) < 5 || sep < 0 || sep+2 >= len(f) {
			continue
		}
		out = append(out, mountInfo{Mountpoint: unescapeMountInfo(f[4]), FSType: f[sep+1], Source: unescapeMountInfo(f[sep+2])})
	}
	return out
}

// unescapeMountInfo undoes the kernel's \ooo escapes (space, tab, newline,
// backslash).
func unescapeMountInfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// topMount is the mount on top at mp: the last one listed for it.
func topMount(mounts []mountInfo, mp string) (mountInfo, bool) {
	var top mountInfo
	found := false
	for _, m := range mounts {
		if m.Mountpoint == mp {
			top, found = m, true
		}
	}
	return top, found
}

// isOurs tells a vdrepl FUSE mount from any other.
func (m mountInfo) isOurs() bool {
	return m.FSType == "fuse."+fuseSubtype && m.Source == fuseFsName
}

// clearStaleMount detaches a stale vdrepl mount at mp (absolute, clean).
// It returns the mount it detached; ok is false when mp is not a stale
// mount. A stale mount that is not ours is an ErrStaleMount.
func clearStaleMount(mp string) (detached mountInfo, ok bool, err error) {
	var st unix.Stat_t
	if err := unix.Stat(mp, &st); !errors.Is(err, unix.ENOTCONN) {
		return mountInfo{}, false, nil
	}
	// The mount point's parent is reachable; resolve symlinks there, as
	// the kernel shows mount points with none.
	if dir, err := filepath.EvalSymlinks(filepath.Dir(mp)); err == nil {
		mp = filepath.Join(dir, filepath.Base(mp))
	}
	text, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return mountInfo{}, false, fmt.Errorf("blockdev: mount point %s is stale (%w) and its mount is unknown: %w", mp, unix.ENOTCONN, err)
	}
	m, found := topMount(parseMountInfo(string(text)), mp)
	if !found {
		return mountInfo{}, false, fmt.Errorf("blockdev: mount point %s: %w, and no mount is listed there", mp, unix.ENOTCONN)
	}
	if !m.isOurs() {
		return m, false, fmt.Errorf("%w: %s is a stale %s mount of %q (not connected); unmount it (fusermount3 -uz %s) or choose another mount point", ErrStaleMount, mp, m.FSType, m.Source, mp)
	}
	err = unix.Unmount(mp, unix.MNT_DETACH)
	if errors.Is(err, unix.EPERM) {
		// Not root: the setuid fusermount3 helper may unmount our own.
		out, ferr := exec.Command("fusermount3", "-u", "-z", mp).CombinedOutput()
		if ferr != nil {
			err = fmt.Errorf("%w; fusermount3 -uz: %v: %s", err, ferr, strings.TrimSpace(string(out)))
		} else {
			err = nil
		}
	}
	if err != nil {
		return m, false, fmt.Errorf("blockdev: detach stale vdrepl mount %s: %w", mp, err)
	}
	return m, true, nil
}
