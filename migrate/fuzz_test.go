package migrate

import (
	"errors"
	"testing"
)

// FuzzDecodePrepare: Prepare is the one message that carries key material
// from another host; it is decoded before anything is verified.
func FuzzDecodePrepare(f *testing.F) {
	f.Add([]byte(`{"version":1,"tx":"00112233445566778899aabbccddeeff","source":"a","dest":"b","evidence_digest":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=","transfer_key":{"public":"AA==","duplicate":"AA==","seed":"AA=="},"vms":[{"uuid":"0e2e0e2e-0000-4000-8000-000000000001","generation":2,"nonce":"AAAAAAAAAAAAAAAA","ct":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}]}`))
	f.Add([]byte(`{}`))
	f.Add([]byte(`{"version":1,"vms":[]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := DecodePrepare(b)
		if err != nil {
			if !errors.Is(err, ErrBadMessage) {
				t.Fatalf("untyped error: %v", err)
			}
			return
		}
		if r.validate() != nil || len(r.VMs) == 0 {
			t.Fatalf("accepted an invalid request")
		}
	})
}

// FuzzDecodeFinish: Finish decides commit or abort on the destination.
func FuzzDecodeFinish(f *testing.F) {
	f.Add([]byte(`{"version":1,"tx":"00112233445566778899aabbccddeeff","source":"a","commit":["0e2e0e2e-0000-4000-8000-000000000001"]}`))
	f.Add([]byte(`{"version":1,"tx":"x"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		_, err := DecodeFinish(b)
		if err != nil && !errors.Is(err, ErrBadMessage) {
			t.Fatalf("untyped error: %v", err)
		}
	})
}

// FuzzDecodePull: Pull asks an owner to release keys; it comes from any
// enrolled peer.
func FuzzDecodePull(f *testing.F) {
	f.Add([]byte(`{"version":1,"dest":"host-b","vms":["0e2e0e2e-0000-4000-8000-000000000001"]}`))
	f.Add([]byte(`{"version":1,"dest":"","vms":null}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := DecodePull(b)
		if err != nil {
			if !errors.Is(err, ErrBadMessage) {
				t.Fatalf("untyped error: %v", err)
			}
			return
		}
		if r.validate() != nil || len(r.VMs) == 0 {
			t.Fatalf("accepted an invalid request")
		}
	})
}
