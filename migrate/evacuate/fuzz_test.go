package evacuate_test

import (
	"bytes"
	"errors"
	"os"
	"testing"

	"github.com/vtpmm/vtpmm/migrate/evacuate"
)

// FuzzDecodeRecord: the evacuation record is read back from the registry,
// which any host with registry access can write: it is untrusted input.
// Decoding never panics, fails only with ErrBadRecord, and what it accepts
// encodes and decodes to the same record (the same bytes once encoded).
func FuzzDecodeRecord(f *testing.F) {
	if b, err := os.ReadFile("testdata/record-v1.json"); err == nil {
		f.Add(b)
	}
	f.Add([]byte(`{"version":1,"source":"h","state":"done","started":"2026-01-01T00:00:00Z","updated":"2026-01-01T00:00:00Z","runs":1,"options":{"parallel":4,"headroom":0},"plan":[]}`))
	f.Add([]byte(`{}`))
	f.Add([]byte(`{"version":1,"plan":[{"vm":"x"}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := evacuate.DecodeRecord(b)
		if err != nil {
			if !errors.Is(err, evacuate.ErrBadRecord) {
				t.Fatalf("untyped error: %v", err)
			}
			return
		}
		again, err := evacuate.EncodeRecord(r)
		if err != nil {
			t.Fatalf("accepted a record it cannot encode: %v", err)
		}
		r2, err := evacuate.DecodeRecord(again)
		if err != nil {
			t.Fatalf("re-encoded record refused: %v", err)
		}
		third, err := evacuate.EncodeRecord(r2)
		if err != nil || !bytes.Equal(again, third) {
			t.Fatalf("round trip changed the record: %v\n%s\n%s", err, again, third)
		}
	})
}
