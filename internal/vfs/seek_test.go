package vfs

import (
	"errors"
	"os"
	"reflect"
	"testing"
)

// TestMapSeeker writes and punches a file on every implementation and checks
// that Map (SEEK_DATA/SEEK_HOLE underneath) tells its data from its holes.
// The ranges are 64 KiB aligned so that any filesystem's hole granularity
// (4 KiB on ext4 and tmpfs) resolves them exactly.
func TestMapSeeker(t *testing.T) {
	const k = 1 << 10
	fss := map[string]struct {
		fs  FS
		dir string
	}{
		"os":     {Default, t.TempDir()},
		"memfs":  {NewMemFS(), "/"},
		"errors": {NewErrorFS(NewMemFS()), "/"},
	}
	if d, err := os.MkdirTemp("/dev/shm", "vfsseek"); err == nil {
		t.Cleanup(func() { os.RemoveAll(d) })
		fss["tmpfs"] = struct {
			fs  FS
			dir string
		}{Default, d}
	}
	for name, tc := range fss {
		t.Run(name, func(t *testing.T) {
			f, err := tc.fs.OpenFile(tc.dir+"/img", os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if err := f.Truncate(1 << 20); err != nil {
				t.Fatal(err)
			}
			data := make([]byte, 128*k)
			for i := range data {
				data[i] = byte(i) | 1
			}
			if _, err := f.WriteAt(data, 64*k); err != nil {
				t.Fatal(err)
			}
			if _, err := f.WriteAt(data[:64*k], 512*k); err != nil {
				t.Fatal(err)
			}
			if err := f.PunchHole(96*k, 32*k); err != nil {
				t.Fatal(err)
			}
			hole := func(off, n int64) Extent { return Extent{Offset: off * k, Length: n * k, Hole: true, Zero: true} }
			data_ := func(off, n int64) Extent { return Extent{Offset: off * k, Length: n * k} }
			for _, tt := range []struct {
				off, n int64
				want   []Extent
			}{
				{0, 1024, []Extent{hole(0, 64), data_(64, 32), hole(96, 32), data_(128, 64), hole(192, 320), data_(512, 64), hole(576, 448)}},
				{80, 40, []Extent{data_(80, 16), hole(96, 24)}},
				{100, 10, []Extent{hole(100, 10)}},
				{520, 504, []Extent{data_(520, 56), hole(576, 448)}},
			} {
				got, err := Map(f, tt.off*k, tt.n*k)
				if err != nil {
					t.Fatal(err)
				}
				if !reflect.DeepEqual(got, tt.want) {
					t.Errorf("Map(%dK, %dK) = %+v, want %+v", tt.off, tt.n, got, tt.want)
				}
			}
			s := f.(Seeker)
			// Past the end both answer the offset asked about.
			if d, err := s.SeekData(1 << 20); err != nil || d != 1<<20 {
				t.Errorf("SeekData(EOF) = %d, %v", d, err)
			}
			if h, err := s.SeekHole(2 << 20); err != nil || h != 2<<20 {
				t.Errorf("SeekHole(past EOF) = %d, %v", h, err)
			}
			// Only holes follow 576K: SeekData says the size.
			if d, err := s.SeekData(600 * k); err != nil || d != 1<<20 {
				t.Errorf("SeekData(600K) = %d, %v; want the size", d, err)
			}
		})
	}
}

// TestMapWithoutSeeker: a file that cannot say where its holes are is all
// data, and ErrorFS's injected read errors reach Map's caller.
func TestMapWithoutSeeker(t *testing.T) {
	efs := NewErrorFS(noSeekFS{NewMemFS()})
	f, err := efs.OpenFile("/img", os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	f.Truncate(1 << 20)
	got, err := Map(f, 4096, 8192)
	if want := []Extent{{Offset: 4096, Length: 8192}}; err != nil || !reflect.DeepEqual(got, want) {
		t.Errorf("Map without a seeker = %+v, %v; want %+v", got, err, want)
	}
	boom := errors.New("boom")
	efs.InjectAlways(OpRead, boom)
	if _, err := Map(f, 0, 4096); err != nil {
		t.Errorf("Map without a seeker read the file: %v", err)
	}
	f2, err := NewErrorFS(NewMemFS()).OpenFile("/x", os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	f2.Truncate(8192)
	f2.(*errorFile).fs.InjectAlways(OpRead, boom)
	if _, err := Map(f2, 0, 4096); !errors.Is(err, boom) {
		t.Errorf("Map with an injected read error: %v, want boom", err)
	}
}

// noSeekFS hides the Seeker of its files.
type noSeekFS struct{ FS }

type noSeekFile struct{ File }

func (n noSeekFS) OpenFile(name string, flag int, perm os.FileMode) (File, error) {
	f, err := n.FS.OpenFile(name, flag, perm)
	if err != nil {
		return nil, err
	}
	return noSeekFile{f}, nil
}
