package guestseal

import (
	"bytes"
	"errors"
	"testing"
)

// FuzzDecodeMeta: the NV record that names the sealed PCRs is read from
// the guest's TPM, where anything with owner authorization can rewrite it.
// The decoder refuses with ErrNotSealed, and whatever it accepts is the
// exact encoding of what it returns (so Unseal's policy and its report of
// changed PCRs use what Seal recorded, or nothing).
func FuzzDecodeMeta(f *testing.F) {
	v := bytes.Repeat([]byte{0xab}, 32)
	f.Add(encodeMeta([]int{7}, [][]byte{v}))
	f.Add(encodeMeta([]int{0, 7, 14}, [][]byte{v, v, v}))
	f.Add([]byte{metaVersion, 0})
	f.Add([]byte{metaVersion, 2, 1})
	f.Fuzz(func(t *testing.T, b []byte) {
		pcrs, vals, err := decodeMeta(b)
		if err != nil {
			if !errors.Is(err, ErrNotSealed) {
				t.Fatalf("untyped error: %v", err)
			}
			return
		}
		if len(pcrs) != len(vals) {
			t.Fatalf("%d PCRs, %d values", len(pcrs), len(vals))
		}
		for _, v := range vals {
			if len(v) != 32 {
				t.Fatalf("a value of %d bytes", len(v))
			}
		}
		if !bytes.Equal(encodeMeta(pcrs, vals), b) {
			t.Fatal("accepted bytes that are not the encoding of the record")
		}
		_ = selection(pcrs)
	})
}
