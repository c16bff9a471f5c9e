package strictjson

import (
	"errors"
	"strings"
	"testing"
)

func TestDecode(t *testing.T) {
	type msg struct {
		A int    `json:"a"`
		B string `json:"b,omitempty"`
	}
	for _, tc := range []struct {
		in      string
		max     int
		wantErr error // nil: ok; errAny: any error
	}{
		{`{"a": 1}`, 0, nil},
		{`{"a": 1, "b": "x"}`, 100, nil},
		{`{"a": 1} `, 100, nil},
		{`{"a": 1, "c": 2}`, 100, errAny},
		{`{"a": 1}{"a": 2}`, 100, ErrTrailingData},
		{`{"a": 1} x`, 100, errAny},
		{`{"a": 1}`, 3, ErrTooLarge},
		{`{"a": "1"}`, 100, errAny},
		{``, 100, errAny},
	} {
		var m msg
		err := Decode([]byte(tc.in), &m, tc.max)
		switch {
		case tc.wantErr == nil && err != nil:
			t.Errorf("%q: %v", tc.in, err)
		case tc.wantErr == errAny && err == nil:
			t.Errorf("%q: accepted", tc.in)
		case tc.wantErr != nil && tc.wantErr != errAny && !errors.Is(err, tc.wantErr):
			t.Errorf("%q: got %v, want %v", tc.in, err, tc.wantErr)
		}
		var r msg
		if rerr := DecodeReader(strings.NewReader(tc.in), &r, max(tc.max, 100)); (rerr == nil) != (err == nil) && tc.wantErr != ErrTooLarge {
			t.Errorf("%q: DecodeReader %v, Decode %v", tc.in, rerr, err)
		}
	}
	if err := DecodeReader(strings.NewReader(`{"a": 1}`), new(msg), 3); !errors.Is(err, ErrTooLarge) {
		t.Errorf("DecodeReader over the limit: %v", err)
	}
}

var errAny = errors.New("any error")
