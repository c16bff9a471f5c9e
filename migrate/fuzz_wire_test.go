package migrate

import (
	"bytes"
	"encoding/json"
	"errors"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/identity"
)

// fuzzStrict checks one message type of DecodeStrict: refusals wrap
// ErrBadMessage, and what it accepts encodes to bytes it accepts again,
// with the same encoding.
func fuzzStrict[T any](t *testing.T, what string, b []byte) {
	v, err := DecodeStrict[T](what, b)
	if err != nil {
		if !errors.Is(err, ErrBadMessage) {
			t.Fatalf("%s: untyped error: %v", what, err)
		}
		return
	}
	enc, err := json.Marshal(v)
	if err != nil {
		t.Fatalf("%s: decoded but does not encode: %v", what, err)
	}
	v2, err := DecodeStrict[T](what, enc)
	if err != nil {
		t.Fatalf("%s: re-encoded message refused: %v (%s)", what, err, enc)
	}
	if enc2, _ := json.Marshal(v2); !bytes.Equal(enc, enc2) {
		t.Fatalf("%s: round trip changed the message:\n%s\n%s", what, enc, enc2)
	}
}

// FuzzDecodeStrictRequests: the requests without a decoder of their own
// (Evidence, Status, Identity, Activate) come from any peer that has a
// certificate of the fleet's CA; the server decodes them before it checks
// who sent them.
func FuzzDecodeStrictRequests(f *testing.F) {
	f.Add([]byte(`{"version":1,"nonce":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=","pcrs":{"sha256":[0,1,7]},"source":"host-a"}`))
	f.Add([]byte(`{"tx":"00112233445566778899aabbccddeeff","vms":["0e2e0e2e-0000-4000-8000-000000000001"],"from":"host-a"}`))
	f.Add([]byte(`{"from":"host-a"}`))
	f.Add([]byte(`{"from":"host-a","challenge":{"credential_blob":"AAE=","encrypted_secret":"AAE=","ek_digest":"AAE=","ak_name":"AAE="}}`))
	f.Add([]byte(`{"from":"host-a","secret":"AAE="}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		fuzzStrict[EvidenceRequest](t, "evidence", b)
		fuzzStrict[StatusRequest](t, "status", b)
		fuzzStrict[IdentityRequest](t, "identity", b)
		fuzzStrict[ActivateRequest](t, "activate", b)
	})
}

// FuzzOpenFromTransfer: the transfer envelope. A Prepare carries each VM
// key sealed under the batch's transfer key, bound to the transaction, the
// VM, its generation, both hosts and the evidence the source verified.
// Whatever a peer changes in the message, a key opens only from the bytes
// the source sealed, with all of the binding unchanged.
func FuzzOpenFromTransfer(f *testing.F) {
	tk := bytes.Repeat([]byte{0x42}, 32)
	// Deterministic nonces: every fuzz worker process rebuilds the same seed.
	s, err := transferSealer(tk, bytes.NewReader(bytes.Repeat([]byte{0x5a, 0x01, 0xc3}, 64)))
	if err != nil {
		f.Fatal(err)
	}
	key, err := vtpm.NewVMKey(bytes.NewReader(bytes.Repeat([]byte{7}, 32)))
	if err != nil {
		f.Fatal(err)
	}
	req := &PrepareRequest{Version: ProtocolVersion, TxID: "00112233445566778899aabbccddeeff", Source: "host-a", Dest: "host-b",
		EvidenceDigest: bytes.Repeat([]byte{9}, 32),
		TransferKey:    identity.WrappedKey{Public: []byte{1}, Duplicate: []byte{2}, Seed: []byte{3}}}
	vms := []TxVM{{UUID: "0e2e0e2e-0000-4000-8000-000000000001", Generation: 2}, {UUID: "0e2e0e2e-0000-4000-8000-000000000002", Name: "b", Generation: 7}}
	for _, vm := range vms {
		w, err := sealForTransfer(s, req, vm, key)
		if err != nil {
			f.Fatal(err)
		}
		req.VMs = append(req.VMs, w)
	}
	golden, err := json.Marshal(req)
	if err != nil {
		f.Fatal(err)
	}
	if _, err := DecodePrepare(golden); err != nil {
		f.Fatalf("the seed does not decode: %v", err)
	}
	sealed := map[string]WrappedVM{}
	for _, w := range req.VMs {
		sealed[w.UUID] = w
	}
	f.Add(golden)
	f.Add(bytes.Replace(golden, []byte(`"generation":2`), []byte(`"generation":3`), 1))
	f.Add(bytes.Replace(golden, []byte(`"host-b"`), []byte(`"host-c"`), 1))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := DecodePrepare(b)
		if err != nil {
			return
		}
		for _, w := range r.VMs {
			k, err := openFromTransfer(s, r, w)
			if err != nil {
				if k.Valid() {
					t.Fatal("a refused key was returned")
				}
				continue
			}
			orig, ok := sealed[w.UUID]
			if !ok || r.TxID != req.TxID || r.Source != req.Source || r.Dest != req.Dest || !bytes.Equal(r.EvidenceDigest, req.EvidenceDigest) ||
				w.Generation != orig.Generation || !bytes.Equal(w.Nonce, orig.Nonce) || !bytes.Equal(w.Ciphertext, orig.Ciphertext) {
				t.Fatalf("VM %s opened under a changed binding", w.UUID)
			}
			if !k.Equal(key) {
				t.Fatal("a different key opened")
			}
			k.Destroy()
		}
	})
}

// FuzzLedgerRecord: one transaction record as the ledger check reads it
// from a damaged or edited ledger file. The check refuses it or accepts a
// record that the ledger's own reader (getTx) decodes to the same
// transaction, that encodes back to a record the check accepts, and whose
// VMs the VM index may name while it is open.
func FuzzLedgerRecord(f *testing.F) {
	at := time.Date(2026, 12, 6, 10, 0, 0, 0, time.UTC)
	for _, tx := range []Tx{
		{ID: "00112233445566778899aabbccddeeff", Role: RoleSource, Peer: "host-b", State: SrcPrepared,
			VMs: []TxVM{{UUID: "0e2e0e2e-0000-4000-8000-000000000001", Name: "a", Generation: 2}}, Created: at, Updated: at},
		{ID: "00112233445566778899aabbccddeeff", Role: RoleSource, Peer: "host-b", State: SrcMigrated, Pulled: true, Lease: at.Add(time.Minute),
			VMs: []TxVM{{UUID: "0e2e0e2e-0000-4000-8000-000000000001", Generation: 2, Outcome: OutcomeFailed, Error: "x"}}, Created: at, Updated: at.Add(time.Second)},
		{ID: "00112233445566778899aabbccddeeff", Role: RoleDestination, Peer: "host-a", State: DstCommitted, Reason: "done",
			VMs: []TxVM{{UUID: "0e2e0e2e-0000-4000-8000-000000000001", Generation: 3, Outcome: OutcomeCommitted}}, Created: at, Updated: at},
	} {
		b, err := json.Marshal(tx)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(tx.ID, b)
	}
	f.Add("x", []byte(`{"id":"x","role":"source","peer":"p","state":"src-begun","vms":[],"created":"2026-01-01T00:00:00Z","updated":"2025-01-01T00:00:00Z"}`))
	f.Fuzz(func(t *testing.T, id string, b []byte) {
		check := func(rec []byte, index map[string][]byte) (int, int, error) {
			return checkRecords(map[string]map[string][]byte{"tx": {id: rec}, "vm": index})
		}
		n, open, err := check(b, map[string][]byte{})
		if err != nil {
			return
		}
		var tx Tx
		if err := json.Unmarshal(b, &tx); err != nil || tx.ID != id || n != 1 || open > 1 {
			t.Fatalf("the ledger's reader disagrees: %v (%d records, %d open)", err, n, open)
		}
		again, err := json.Marshal(tx)
		if err != nil {
			t.Fatal(err)
		}
		index := map[string][]byte{}
		if !tx.State.Final() {
			for _, vm := range tx.VMs {
				index[vm.UUID] = []byte(id)
			}
		}
		if _, _, err := check(again, index); err != nil {
			t.Fatalf("re-encoded record refused: %v (%s)", err, again)
		}
		if tx.State.Final() && len(tx.VMs) > 0 {
			if _, _, err := check(again, map[string][]byte{tx.VMs[0].UUID: []byte(id)}); err == nil {
				t.Fatal("the VM index may name a closed transaction")
			}
		}
	})
}

// FuzzApartRecord: an apart record (ledger_apart.go) decodes only when it
// names its own VM, a host id and a transaction id, and re-encodes to a
// record that decodes the same.
func FuzzApartRecord(f *testing.F) {
	vm := "0e2e0e2e-0000-4000-8000-000000000001"
	f.Add(vm, []byte(`{"vm":"`+vm+`","host":"host-b","tx":"00112233445566778899aabbccddeeff","since":"2026-12-07T12:00:00Z"}`))
	f.Add(vm, []byte(`{"vm":"`+vm+`","host":"host-b","tx":"0011"}`))
	f.Add("x", []byte(`{}`))
	f.Fuzz(func(t *testing.T, key string, b []byte) {
		a, err := decodeApart(key, b)
		if err != nil {
			return
		}
		again, err := json.Marshal(a)
		if err != nil {
			t.Fatal(err)
		}
		b2, err := decodeApart(key, again)
		if err != nil || b2.VM != a.VM || b2.Host != a.Host || b2.Tx != a.Tx || !b2.Since.Equal(a.Since) {
			t.Fatalf("re-encoded record: %+v, %v (was %+v)", b2, err, a)
		}
	})
}
