package attest

import (
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"
)

func readFile(t testing.TB, rel string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(rw, rel))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// gcePCRs returns all 24 quoted PCRs of the COS attestation, every bank.
func gcePCRs(t testing.TB) PCRValues {
	t.Helper()
	e := loadExpected(t)[0]
	out := PCRValues{}
	add := func(bank Bank, m map[string]string) {
		if out[bank] == nil {
			out[bank] = map[int][]byte{}
		}
		for k, v := range m {
			i, _ := strconv.Atoi(k)
			out[bank][i], _ = hex.DecodeString(v)
		}
	}
	add("sha1", e.SHA1)
	add("sha256", e.SHA256)
	add("sha384", e.SHA384)
	for b, m := range e.Other {
		add(Bank(b), m)
	}
	return out
}

func TestVerifyQuoteGCE(t *testing.T) {
	ak, err := ParsePublic("AK", readFile(t, "attestations/extracted/gce-cos-85.akpub.tpmt_public.bin"))
	if err != nil {
		t.Fatal(err)
	}
	if err := CheckAK(ak); err != nil {
		t.Fatalf("real GCE AK refused: %v", err)
	}
	pcrs := gcePCRs(t)
	tampered := gcePCRs(t)
	tampered["sha256"][7][0] ^= 1
	tampered["sha1"][7][0] ^= 1
	tampered["sha384"][7][0] ^= 1
	nonce9009 := []byte{0x90, 0x09}
	tests := []struct {
		name    string
		file    string
		nonce   []byte
		pcrs    PCRValues
		wantErr error
	}{
		{"nonce9009 accepted", "gce-cos-85-nonce9009", nonce9009, pcrs, nil},
		{"no-nonce accepted with empty nonce", "gce-cos-85-no-nonce", nil, pcrs, nil},
		{"nonce9009 under another nonce", "gce-cos-85-nonce9009", []byte{0x90, 0x0a}, pcrs, ErrQuoteNonce},
		{"replayed old quote for a new nonce", "gce-cos-85-no-nonce", nonce9009, pcrs, ErrQuoteNonce},
		{"PCR 7 value changed", "gce-cos-85-nonce9009", nonce9009, tampered, ErrPCRDigest},
	}
	for _, tt := range tests {
		for i, bank := range []string{"SHA1", "SHA256", "SHA384"} {
			t.Run(fmt.Sprintf("%s/%s", tt.name, bank), func(t *testing.T) {
				base := fmt.Sprintf("attestations/extracted/%s.quote%d.%s.", tt.file, i, bank)
				res, err := VerifyQuote(ak, readFile(t, base+"tpms_attest.bin"), readFile(t, base+"tpmt_signature.bin"), tt.nonce, tt.pcrs)
				if tt.wantErr != nil {
					if !errors.Is(err, tt.wantErr) {
						t.Fatalf("err = %v, want %v", err, tt.wantErr)
					}
					return
				}
				if err != nil {
					t.Fatal(err)
				}
				if !res.Covers(Bank(lower(bank)), 23) || !res.Covers(Bank(lower(bank)), 0) {
					t.Fatalf("selection %s does not cover PCR 0-23", res)
				}
			})
		}
	}
}

func lower(s string) string {
	b := []byte(s)
	for i, c := range b {
		if c >= 'A' && c <= 'Z' {
			b[i] = c + 32
		}
	}
	return string(b)
}

func TestVerifyQuoteGCETampered(t *testing.T) {
	ak, err := ParsePublic("AK", readFile(t, "attestations/extracted/gce-cos-85.akpub.tpmt_public.bin"))
	if err != nil {
		t.Fatal(err)
	}
	base := "attestations/extracted/gce-cos-85-nonce9009.quote1.SHA256."
	att := readFile(t, base+"tpms_attest.bin")
	sig := readFile(t, base+"tpmt_signature.bin")
	tests := []struct {
		name    string
		mutate  func(att, sig []byte) ([]byte, []byte)
		wantErr error
	}{
		{"flipped signature byte", func(a, s []byte) ([]byte, []byte) { s[len(s)-1] ^= 1; return a, s }, ErrQuoteSignature},
		{"flipped clock byte", func(a, s []byte) ([]byte, []byte) { a[len(a)-40] ^= 1; return a, s }, ErrQuoteSignature},
		{"bad magic", func(a, s []byte) ([]byte, []byte) { a[0] = 0; return a, s }, ErrMalformedTPMStruct},
		{"truncated attest", func(a, s []byte) ([]byte, []byte) { return a[:20], s }, ErrQuoteSignature},
		{"garbage signature", func(a, s []byte) ([]byte, []byte) { return a, []byte{0, 0x14, 0, 1} }, ErrQuoteSignature},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a, s := tt.mutate(append([]byte(nil), att...), append([]byte(nil), sig...))
			_, err := VerifyQuote(ak, a, s, []byte{0x90, 0x09}, gcePCRs(t))
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("err = %v, want %v", err, tt.wantErr)
			}
		})
	}
}
