package strictjson

import (
	"bytes"
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"
)

// fuzzMsg has the shapes vtpmm's messages use: nested structs, slices,
// maps, bytes (base64), numbers of both signs and an omitted field.
type fuzzMsg struct {
	Version int               `json:"version"`
	ID      string            `json:"id"`
	Data    []byte            `json:"data,omitempty"`
	Gen     uint64            `json:"gen"`
	Rev     int64             `json:"rev,omitempty"`
	Held    map[string]uint64 `json:"held,omitempty"`
	Items   []fuzzItem        `json:"items"`
	Ok      bool              `json:"ok,omitempty"`
}

type fuzzItem struct {
	UUID string   `json:"uuid"`
	Tags []string `json:"tags,omitempty"`
}

// FuzzDecode: Decode accepts exactly one JSON value of at most max bytes
// with no unknown field. What it accepts is valid JSON that encoding/json
// decodes to the same value, and encodes back to bytes Decode accepts with
// the same value; what is over the limit is ErrTooLarge.
func FuzzDecode(f *testing.F) {
	f.Add([]byte(`{"version":1,"id":"x","data":"AAEC","gen":2,"rev":-3,"held":{"a":1},"items":[{"uuid":"u","tags":["t"]}],"ok":true}`), 0)
	f.Add([]byte(`{"version":1,"id":"x","gen":2,"items":null} `), 64)
	f.Add([]byte(`{"version":1,"x":2}`), 0)
	f.Add([]byte(`{"version":1}{"version":2}`), 0)
	f.Add([]byte(`{"version":1} x`), 0)
	f.Add([]byte(`{"ID":"case","Version":1}`), 0)
	f.Add([]byte(`[1,2]`), 0)
	f.Add([]byte(`null`), 4)
	f.Add([]byte(`{"held":{"a":18446744073709551616}}`), 0)
	f.Fuzz(func(t *testing.T, b []byte, max int) {
		var m fuzzMsg
		err := Decode(b, &m, max)
		if max > 0 && len(b) > max {
			if !errors.Is(err, ErrTooLarge) {
				t.Fatalf("%d bytes over a limit of %d: %v", len(b), max, err)
			}
			return
		}
		var generic any
		errGeneric := Decode(b, &generic, max)
		if err != nil {
			return
		}
		if !json.Valid(b) {
			t.Fatalf("accepted invalid JSON %q", b)
		}
		if errGeneric != nil {
			t.Fatalf("accepted as a struct but not as a value: %v", errGeneric)
		}
		var std fuzzMsg
		if err := json.Unmarshal(b, &std); err != nil || !reflect.DeepEqual(std, m) {
			t.Fatalf("encoding/json disagrees: %v\n%+v\n%+v", err, std, m)
		}
		again, err := json.Marshal(&m)
		if err != nil {
			t.Fatal(err)
		}
		var m2 fuzzMsg
		if err := Decode(again, &m2, 0); err != nil {
			t.Fatalf("re-encoded message refused: %v (%s)", err, again)
		}
		third, _ := json.Marshal(&m2)
		if !bytes.Equal(again, third) {
			t.Fatalf("round trip changed the message:\n%s\n%s", again, third)
		}
	})
}

// FuzzDecodeReader: the reader form agrees with Decode, and never reads
// more than max+1 bytes.
func FuzzDecodeReader(f *testing.F) {
	f.Add([]byte(`{"version":1,"id":"x","gen":2,"items":[]}`), 100)
	f.Add([]byte(`{"version":1,"id":"x","gen":2,"items":[]}`), 10)
	f.Fuzz(func(t *testing.T, b []byte, max int) {
		if max <= 0 || max > 1<<20 {
			return
		}
		r := strings.NewReader(string(b))
		var m1, m2 fuzzMsg
		err1 := DecodeReader(r, &m1, max)
		if read := len(b) - r.Len(); read > max+1 {
			t.Fatalf("read %d bytes with a limit of %d", read, max)
		}
		err2 := Decode(b, &m2, max)
		if (err1 == nil) != (err2 == nil) || !reflect.DeepEqual(m1, m2) {
			t.Fatalf("DecodeReader %v, Decode %v", err1, err2)
		}
	})
}
