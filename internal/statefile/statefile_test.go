package statefile

import (
	"bytes"
	"errors"
	"testing"
)

type body struct {
	Name  string `json:"name"`
	Count int    `json:"count"`
}

func TestRoundTripAndRefusals(t *testing.T) {
	b, err := Encode("vdrepl-test", 3, body{Name: "a<b>", Count: 42})
	if err != nil {
		t.Fatal(err)
	}
	var got body
	if err := Decode("vdrepl-test", 3, b, &got); err != nil || got != (body{"a<b>", 42}) {
		t.Fatalf("round trip: %+v %v", got, err)
	}
	for name, c := range map[string]struct {
		format  string
		version int
		data    []byte
	}{
		"other format":  {"vdrepl-other", 3, b},
		"other version": {"vdrepl-test", 4, b},
		"changed body":  {"vdrepl-test", 3, bytes.Replace(b, []byte("42"), []byte("43"), 1)},
		"not JSON":      {"vdrepl-test", 3, []byte("{")},
	} {
		if err := Decode(c.format, c.version, c.data, &got); !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: %v, want ErrInvalid", name, err)
		}
	}
}
