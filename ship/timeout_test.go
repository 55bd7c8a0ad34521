package ship

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/vdrepl/vdrepl/internal/wire"
)

// TestSyncTimeoutSaysWhy: a Sync whose deadline passes says what it
// waited for and why it did not come (issue 15, item 11: `replication
// sync --timeout 10s` with the replica down ended with "context deadline
// exceeded" only), and is still a context.DeadlineExceeded.
func TestSyncTimeoutSaysWhy(t *testing.T) {
	for _, tc := range []struct {
		name string
		// trouble breaks the replica: before the initial copy (early), or
		// after it and the first cycle.
		trouble func(e *env)
		early   bool
		want    []string // %[1]s is the replica's address, %[2]d the cycle
	}{
		{name: "replica down", trouble: func(e *env) { e.px.down() },
			want: []string{"ship: cycle %[2]d of vm1 not applied within 1.5s: the replica at %[1]s has not answered since 20",
				"(last error: ", "connection refused", "; next retry in "}},
		{name: "replica full", trouble: func(e *env) {
			e.rep.mu.Lock()
			e.rep.fail = func(r *http.Request) (int, string) {
				if strings.HasSuffix(r.URL.Path, "/commit") {
					return http.StatusInsufficientStorage, wire.CodeFull
				}
				return 0, ""
			}
			e.rep.mu.Unlock()
		}, want: []string{"ship: cycle %[2]d of vm1 not applied within 1.5s: the replica at %[1]s answers with an error (last error: ", "(full)", "; next retry in "}},
		{name: "never there", early: true, trouble: func(e *env) { e.px.down() },
			want: []string{"ship: no cycle of vm1 sealed within 1.5s: the initial copy has not begun; the replica at %[1]s has not answered since shipping started at 20",
				"connection refused"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, 1<<20)
			e.cfg.RetryScale = 0.05 // 100ms, 200ms, 400ms, ...
			if tc.early {
				tc.trouble(e)
			}
			r := e.start(e.cfg)
			var c uint64
			if !tc.early {
				waitReplicating(t, r.s)
				var err error
				if c, err = r.s.Sync(syncCtx(t), false); err != nil {
					t.Fatal(err)
				}
				tc.trouble(e)
				c++
			}
			e.j.write(0, 0, random(4096))
			ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
			defer cancel()
			_, err := r.s.Sync(ctx, false)
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("Sync: %v, want a context.DeadlineExceeded", err)
			}
			var te *SyncTimeoutError
			if !errors.As(err, &te) || te.Cycle != c || te.VM != "vm1" {
				t.Fatalf("Sync: %#v, want a *SyncTimeoutError for cycle %d", err, c)
			}
			msg := err.Error()
			for _, w := range tc.want {
				if strings.Contains(w, "%[") {
					w = fmt.Sprintf(w, e.px.addr(), c)
				}
				if !strings.Contains(msg, w) {
					t.Errorf("%q is not in the error:\n%s", w, msg)
				}
			}
			if strings.Contains(msg, "context deadline exceeded") {
				t.Errorf("the error still ends in the context's: %s", msg)
			}
		})
	}
}
