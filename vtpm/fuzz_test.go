package vtpm

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// FuzzUnmarshalEnvelope: an envelope on disk is untrusted input.
func FuzzUnmarshalEnvelope(f *testing.F) {
	seeds, _ := filepath.Glob("testdata/envelope-*.json")
	for _, p := range seeds {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte(`{}`))
	f.Add([]byte(`{"v":1}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		e, err := UnmarshalEnvelope(b)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrUnsupportedVersion) {
				t.Fatalf("untyped error: %v", err)
			}
			return
		}
		if CheckVMID(e.VMID) != nil || len(e.Ciphertext) != 48 {
			t.Fatalf("accepted an invalid envelope: %+v", e)
		}
		if _, err := MarshalEnvelope(e); err != nil {
			t.Fatal(err)
		}
	})
}

// FuzzDecodeVaultFile: the vault file is read before anything is verified.
func FuzzDecodeVaultFile(f *testing.F) {
	if b, err := os.ReadFile("testdata/vault-v1.json"); err == nil {
		f.Add(b)
	}
	f.Add([]byte(`{"version":1}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		vf, err := decodeVaultFile(b)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrUnsupportedVersion) {
				t.Fatalf("untyped error: %v", err)
			}
			return
		}
		for _, s := range vf.Slots {
			if s.Kind == slotPCR {
				_, _, _ = s.pcrs()
			}
		}
	})
}

func TestGoldenEnvelopes(t *testing.T) {
	tests := []struct {
		file string
		want error
	}{
		{"envelope-v1.json", nil},
		{"envelope-v2.json", ErrUnsupportedVersion},
		{"envelope-badvm.json", ErrCorrupt},
		{"envelope-extra-field.json", ErrCorrupt},
		{"envelope-short-ct.json", ErrCorrupt},
		{"envelope-trailing.json", ErrCorrupt},
	}
	for _, tc := range tests {
		t.Run(tc.file, func(t *testing.T) {
			b, err := os.ReadFile(filepath.Join("testdata", tc.file))
			if err != nil {
				t.Fatal(err)
			}
			_, err = UnmarshalEnvelope(b)
			if !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
		})
	}
}
