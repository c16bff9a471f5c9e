package vtpm

import (
	"errors"
	"reflect"
	"slices"
	"strings"
	"testing"
)

// FuzzParseRecoveryKey: the recovery key is typed in by an operator (or
// pasted from a file). It parses back from what Reveal prints, and a
// refusal is ErrRecoveryKey and never repeats what was typed.
func FuzzParseRecoveryKey(f *testing.F) {
	f.Add("0123abcd-0123abcd-0123abcd-0123abcd-0123abcd-0123abcd-0123abcd-0123abcd")
	f.Add("0123ABCD 0123abcd 0123abcd 0123abcd\n0123abcd 0123abcd 0123abcd 0123abcd")
	f.Add("0123abcd-0123abcd")
	f.Add("zz23abcd-0123abcd-0123abcd-0123abcd-0123abcd-0123abcd-0123abcd-0123abcd")
	f.Fuzz(func(t *testing.T, s string) {
		k, err := ParseRecoveryKey(s)
		if err != nil {
			if !errors.Is(err, ErrRecoveryKey) {
				t.Fatalf("untyped error: %v", err)
			}
			if ts := strings.TrimSpace(s); len(ts) >= 8 && strings.Contains(err.Error(), ts) {
				t.Fatalf("the error repeats the input: %v", err)
			}
			return
		}
		defer k.Destroy()
		again, err := ParseRecoveryKey(k.Reveal())
		if err != nil {
			t.Fatalf("Reveal's form does not parse: %v", err)
		}
		defer again.Destroy()
		if *again.k != *k.k {
			t.Fatal("round trip changed the key")
		}
	})
}

// FuzzParsePCRSelection: a PCR selection comes from the configuration or
// the command line. What parses is sorted, unique, within 0..23, and
// parses again from its String form to the same selection.
func FuzzParsePCRSelection(f *testing.F) {
	for _, s := range []string{"0,2,4,7", "sha256:7", " 7 , 7,0", "24", "-1", "sha1:7", "", ",", "+7"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		p, err := ParsePCRSelection(s)
		if err != nil {
			return
		}
		if len(p.PCRs) == 0 || !slices.IsSorted(p.PCRs) || len(slices.Compact(slices.Clone(p.PCRs))) != len(p.PCRs) ||
			p.PCRs[0] < 0 || p.PCRs[len(p.PCRs)-1] > 23 {
			t.Fatalf("accepted %q as %v", s, p.PCRs)
		}
		again, err := ParsePCRSelection(p.String())
		if err != nil || !reflect.DeepEqual(again, p) {
			t.Fatalf("round trip: %v %v, want %v", err, again, p)
		}
		_ = p.tpml()
	})
}
