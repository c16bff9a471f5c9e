package vtpm_test

import (
	"errors"
	"testing"

	"github.com/vtpmm/vtpmm/vtpm"
)

// FuzzAnchorFile feeds arbitrary bytes to the anchor file decoder: it must
// never panic, and anything it refuses is ErrCorrupt, ErrWrongKey or
// ErrUnsupportedVersion.
func FuzzAnchorFile(f *testing.F) {
	good, err := vtpm.EncodeAnchorFileForTest()
	if err != nil {
		f.Fatal(err)
	}
	if err := vtpm.DecodeAnchorFile(good); err != nil {
		f.Fatalf("the seed does not decode: %v", err)
	}
	f.Add(good)
	f.Add([]byte("{}"))
	f.Add([]byte(""))
	f.Add(good[:len(good)/2])
	f.Fuzz(func(t *testing.T, b []byte) {
		err := vtpm.DecodeAnchorFile(b)
		if err != nil && !errors.Is(err, vtpm.ErrCorrupt) && !errors.Is(err, vtpm.ErrWrongKey) && !errors.Is(err, vtpm.ErrUnsupportedVersion) {
			t.Fatalf("untyped error: %v", err)
		}
	})
}
