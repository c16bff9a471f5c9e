package migrate

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/vtpmm/vtpmm/vtpm/identity"
)

// FuzzDecodeReplica: a replica refresh comes from any peer with a fleet
// certificate; the server decodes it before it checks the sender. Refusals
// wrap ErrBadMessage; what it accepts encodes to a message it accepts
// again, unchanged.
func FuzzDecodeReplica(f *testing.F) {
	state := []byte("vTPM state at rest")
	sum := sha256.Sum256(state)
	ok := ReplicaRequest{Version: ProtocolVersion, ID: strings.Repeat("ab", 16), Owner: "host-a", Standby: "host-b",
		VM: "0e2e0e2e-0000-4000-8000-000000000001", Generation: 3, KeyID: strings.Repeat("0f", 32),
		EvidenceDigest: bytes.Repeat([]byte{1}, 32), TransferKey: identity.WrappedKey{Public: []byte{1}, Duplicate: []byte{2}, Seed: []byte{3}},
		Nonce: bytes.Repeat([]byte{4}, 12), Ciphertext: bytes.Repeat([]byte{5}, 48), StateSHA256: sum[:], State: state}
	b, _ := json.Marshal(&ok)
	f.Add(b)
	bad := ok
	bad.Owner = bad.Standby
	b, _ = json.Marshal(&bad)
	f.Add(b)
	bad = ok
	bad.State = []byte("another state")
	b, _ = json.Marshal(&bad)
	f.Add(b)
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := DecodeReplica(b)
		if err != nil {
			if !errors.Is(err, ErrBadMessage) {
				t.Fatalf("untyped error: %v", err)
			}
			return
		}
		enc, err := json.Marshal(r)
		if err != nil {
			t.Fatal(err)
		}
		r2, err := DecodeReplica(enc)
		if err != nil {
			t.Fatalf("re-encoded replica refused: %v", err)
		}
		if enc2, _ := json.Marshal(r2); !bytes.Equal(enc, enc2) {
			t.Fatalf("round trip changed the replica")
		}
	})
}
