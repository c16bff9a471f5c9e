package vtpm

import (
	"bytes"
	"flag"
	"os"
	"testing"
)

var updateCompat = flag.Bool("update-envelope", false, "rewrite testdata/envelope-sealed-v1.json (only with the code that made the envelopes on disk)")

// compatVaultKey and compatVMKey are the keys of the golden envelope.
var (
	compatVaultKey = secret32(bytes.Repeat([]byte{0x5a}, 32))
	compatVMKey    = bytes.Repeat([]byte{0xc3}, 32)
)

// TestEnvelopeOnDiskFormat opens an envelope sealed (with -update-envelope)
// by the code that wrote the envelopes that exist on hosts today: a change
// of the associated data or the key derivation must not make them
// unreadable.
func TestEnvelopeOnDiskFormat(t *testing.T) {
	key := compatVaultKey
	v, err := newVault(VaultConfig{}, &key)
	if err != nil {
		t.Fatal(err)
	}
	const vm, host = "0e2e0e2e-0000-4000-8000-0000000000c1", "host-a"
	if *updateCompat {
		s, err := secretFromBytes(bytes.Clone(compatVMKey))
		if err != nil {
			t.Fatal(err)
		}
		e, err := v.SealVMKey(host, vm, 7, VMKey{k: s})
		if err != nil {
			t.Fatal(err)
		}
		b, _ := MarshalEnvelope(e)
		if err := os.WriteFile("testdata/envelope-sealed-v1.json", b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	b, err := os.ReadFile("testdata/envelope-sealed-v1.json")
	if err != nil {
		t.Fatal(err)
	}
	e, err := UnmarshalEnvelope(b)
	if err != nil {
		t.Fatal(err)
	}
	k, err := v.OpenVMKey(e, host, vm)
	if err != nil {
		t.Fatalf("the envelope written by an earlier build does not open: %v", err)
	}
	if !bytes.Equal(k.k[:], compatVMKey) || e.Generation != 7 {
		t.Fatalf("opened another key (generation %d)", e.Generation)
	}
	e.Generation = 8
	if _, err := v.OpenVMKey(e, host, vm); err == nil {
		t.Fatal("the envelope opened for another generation")
	}
}
