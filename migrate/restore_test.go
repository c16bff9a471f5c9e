package migrate

import (
	"crypto/sha256"
	"encoding/json"
	"errors"
	"testing"

	"github.com/vtpmm/vtpmm/vtpm/identity"
)

// validRestore is a structurally valid RestoreRequest (its key material is
// not real: decoding checks the frame, not the cryptography).
func validRestore() *RestoreRequest {
	blob := []byte("encrypted swtpm state")
	sum := sha256.Sum256(blob)
	vm := "0e2e0e2e-0000-4000-8000-000000000001"
	return &RestoreRequest{
		Prepare: PrepareRequest{Version: ProtocolVersion, TxID: "00112233445566778899aabbccddeeff", Source: "host-a", Dest: "host-b",
			EvidenceDigest: make([]byte, 32), TransferKey: identity.WrappedKey{Public: []byte{1}, Duplicate: []byte{1}, Seed: []byte{1}},
			VMs: []WrappedVM{{UUID: vm, Generation: 2, Nonce: make([]byte, 12), Ciphertext: make([]byte, 48)}}},
		States: []RestoredState{{UUID: vm, Bundle: "5bad5bad5bad5bad5bad5bad5bad5bad", SHA256: sum[:], Blob: blob}},
	}
}

// TestDecodeRestore: a restore's states must match its VMs one for one, in
// order, each with a bundle ID and the SHA-256 of its blob; everything a
// Prepare must be, it must be.
func TestDecodeRestore(t *testing.T) {
	for _, tc := range []struct {
		name   string
		change func(r *RestoreRequest)
		ok     bool
	}{
		{"valid", func(*RestoreRequest) {}, true},
		{"no state", func(r *RestoreRequest) { r.States = nil }, false},
		{"state of another VM", func(r *RestoreRequest) { r.States[0].UUID = "0e2e0e2e-0000-4000-8000-000000000002" }, false},
		{"digest differs", func(r *RestoreRequest) { r.States[0].Blob = []byte("changed") }, false},
		{"empty state", func(r *RestoreRequest) { r.States[0].Blob = nil }, false},
		{"bad bundle id", func(r *RestoreRequest) { r.States[0].Bundle = "x" }, false},
		{"bad prepare", func(r *RestoreRequest) { r.Prepare.TxID = "x" }, false},
		{"generation 0", func(r *RestoreRequest) { r.Prepare.VMs[0].Generation = 0 }, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := validRestore()
			tc.change(r)
			b, err := json.Marshal(r)
			if err != nil {
				t.Fatal(err)
			}
			_, err = DecodeRestore(b)
			if (err == nil) != tc.ok {
				t.Fatalf("DecodeRestore: %v, want ok=%v", err, tc.ok)
			}
			if err != nil && !errors.Is(err, ErrBadMessage) {
				t.Fatalf("untyped error: %v", err)
			}
		})
	}
}

// FuzzDecodeRestore: a restore carries key material (wrapped) and vTPM
// states from a relaying host; it is decoded before anything is verified.
func FuzzDecodeRestore(f *testing.F) {
	b, _ := json.Marshal(validRestore())
	f.Add(b)
	f.Add([]byte(`{}`))
	f.Add([]byte(`{"prepare":{"version":1},"states":[]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := DecodeRestore(b)
		if err != nil {
			if !errors.Is(err, ErrBadMessage) {
				t.Fatalf("untyped error: %v", err)
			}
			return
		}
		if r.validate() != nil || len(r.States) != len(r.Prepare.VMs) {
			t.Fatalf("accepted an invalid request")
		}
	})
}
