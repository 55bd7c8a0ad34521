package control

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
)

// nbdFake keeps an NBD allow-list for the client round trip.
type nbdFake struct {
	*fakeHost
	list []NBDAllowEntry
}

func (f *nbdFake) NBDAllowList() []NBDAllowEntry { return f.list }

func (f *nbdFake) NBDAllow(e NBDAllowEntry) error {
	if e.Export == "" {
		return fmt.Errorf("%w: empty export", ErrInvalid)
	}
	f.list = append(f.list, e)
	return nil
}

func (f *nbdFake) NBDDisallow(client, export string) error {
	i := slices.IndexFunc(f.list, func(e NBDAllowEntry) bool { return e.Client == client && e.Export == export })
	if i < 0 {
		return errors.New("no such entry")
	}
	f.list = slices.Delete(f.list, i, i+1)
	return nil
}

func TestNBDAllowClient(t *testing.T) {
	f := &nbdFake{fakeHost: newFakeHost()}
	c := serve(t, f)
	ctx := t.Context()
	want := NBDAllowEntry{Client: "*.example.com", Export: "web 1/*", ReadOnly: true}
	if err := c.NBDAllow(ctx, want); err != nil {
		t.Fatal(err)
	}
	if err := c.NBDAllow(ctx, NBDAllowEntry{Client: "x"}); err == nil || !strings.Contains(err.Error(), "empty export") {
		t.Errorf("NBDAllow of a bad entry: %v", err)
	}
	l, err := c.NBDAllowList(ctx)
	if err != nil || !slices.Equal(l, []NBDAllowEntry{want}) {
		t.Fatalf("NBDAllowList = %+v, %v", l, err)
	}
	// Names with characters that need escaping reach the host intact.
	if err := c.NBDDisallow(ctx, want.Client, want.Export); err != nil {
		t.Fatal(err)
	}
	if len(f.list) != 0 {
		t.Fatalf("after NBDDisallow: %+v", f.list)
	}
}
