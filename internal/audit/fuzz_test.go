package audit

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// FuzzVerify feeds arbitrary bytes to the parser of audit logs (an
// attacker with write access to the file controls them). Verify must not
// panic, must only report chain errors, and must agree with what it
// accepts: a valid log has one record per line and re-verifies.
func FuzzVerify(f *testing.F) {
	good, err := os.ReadFile(filepath.Join("testdata", "chain.log"))
	if err != nil {
		f.Fatal(err)
	}
	lines := bytes.SplitAfter(good, []byte("\n"))
	f.Add(good)
	f.Add([]byte{})
	f.Add(lines[0])
	f.Add(bytes.Join(lines[:3], nil))
	f.Add(append(bytes.Join(lines[:2], nil), lines[3]...))
	f.Add(good[:len(good)-7])
	f.Add([]byte("{}\n"))
	f.Add([]byte(`{"seq":1,"time":"2026-03-01T12:00:00+00:00","host":"h","event":"x","vm":"","peer":"","generation":0,"rule":"","detail":"","prev":"","hash":""}` + "\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		sum, end, err := readChain(bytes.NewReader(data), nil)
		if end > int64(len(data)) || end < 0 {
			t.Fatalf("valid prefix %d beyond %d bytes", end, len(data))
		}
		if err != nil {
			var ce *ChainError
			if !errors.As(err, &ce) || ce.Line != sum.Records+1 {
				t.Fatalf("unexpected error %v (summary %+v)", err, sum)
			}
			if !errors.Is(err, ErrTampered) && !errors.Is(err, ErrTruncated) {
				t.Fatalf("chain error without a sentinel: %v", err)
			}
			// The valid prefix verifies on its own.
			again, err := Verify(bytes.NewReader(data[:end]))
			if err != nil || again != sum {
				t.Fatalf("prefix: %+v %v, want %+v", again, err, sum)
			}
			return
		}
		if end != int64(len(data)) || sum.Records != bytes.Count(data, []byte("\n")) {
			t.Fatalf("accepted %d of %d bytes, %d records", end, len(data), sum.Records)
		}
	})
}
