package apply

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestVerifyPoint: every recovery point reads back to the roots recorded
// when it was taken; a byte flipped in an image changes the latest point's
// root (it shares every block with the images) and is reported as a
// mismatch, not an error; an unknown point is an error.
func TestVerifyPoint(t *testing.T) {
	h, a, dir := setupPoints(t, nil, 3, time.Minute)
	history(t, a, map[uint64]model{}, newModel(testDisks), 1, 6, nil)
	s := h.server()
	ids := pointIDs(t, s)
	if len(ids) < 3 {
		t.Fatalf("points %v, want 3", ids)
	}
	for _, id := range ids {
		c, err := s.VerifyPoint(context.Background(), "vm1", id)
		if err != nil || !c.Match || len(c.Disks) != len(testDisks) || c.CheckedBytes == 0 {
			t.Fatalf("verify of intact point %s: %+v, %v", id, c, err)
		}
	}
	latest := ids[len(ids)-1]
	img := filepath.Join(dir, testDisks[0].Name+".img")
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, 4097); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0x40
	if _, err := f.WriteAt(b, 4097); err != nil {
		t.Fatal(err)
	}
	f.Close()
	c, err := s.VerifyPoint(context.Background(), "vm1", latest)
	if err != nil || c.Match || c.Disks[0].Match || !c.Disks[1].Match {
		t.Fatalf("verify of point %s over a damaged image of disk %s: %+v, %v", latest, testDisks[0].Name, c, err)
	}
	if _, err := s.VerifyPoint(context.Background(), "vm1", "999"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("verify of an unknown point: %v, want ErrNotFound", err)
	}
}
