package identity_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/identity"
	"github.com/vtpmm/vtpmm/vtpm/tpmtest"
)

// foreignMK is an MK-shaped public area whose private key is not in the TPM.
func foreignMK(t testing.TB) []byte {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	p := identity.MKTemplate(nil)
	p.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
		X: tpm2.TPM2BECCParameter{Buffer: k.X.FillBytes(make([]byte, 32))},
		Y: tpm2.TPM2BECCParameter{Buffer: k.Y.FillBytes(make([]byte, 32))},
	})
	return tpm2.Marshal(p)
}

func readPCR(t testing.TB, tpm transport.TPM, i int) []byte {
	t.Helper()
	r, err := tpm2.PCRRead{PCRSelectionIn: tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{
		{Hash: tpm2.TPMAlgSHA256, PCRSelect: tpm2.PCClientCompatible.PCRs(uint(i))}}}}.Execute(tpm)
	if err != nil || len(r.PCRValues.Digests) != 1 {
		t.Fatalf("PCR_Read(%d): %v", i, err)
	}
	return r.PCRValues.Digests[0].Buffer
}

func extend(t testing.TB, tpm transport.TPM, i int) {
	t.Helper()
	d := sha256.Sum256([]byte("tampered"))
	_, err := tpm2.PCRExtend{PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(i), Auth: tpm2.PasswordAuth(nil)},
		Digests: tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: d[:]}}}}.Execute(tpm)
	if err != nil {
		t.Fatal(err)
	}
}

func TestWrapUnwrap(t *testing.T) {
	t.Parallel()
	_, tpm := tpmtest.NewHost(t)
	ctx := context.Background()
	id, err := identity.Provision(ctx, tpm, identity.ProvisionOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// A second, PCR-bound migration key on the same TPM (PCR 16 is
	// resettable and extendable at locality 0).
	pcrMK := identity.Handles{MK: 0x81000012}
	pol, err := identity.MKPolicyDigest([]int{16}, map[int][]byte{16: readPCR(t, tpm, 16)})
	if err != nil {
		t.Fatal(err)
	}
	bound, err := identity.EnsureMK(ctx, tpm, pcrMK, pol)
	if err != nil {
		t.Fatal(err)
	}
	secret := make([]byte, 32)
	if _, err := rand.Read(secret); err != nil {
		t.Fatal(err)
	}
	wrap := func(t *testing.T, mkPub []byte) *identity.WrappedKey {
		w, err := identity.Wrap(rand.Reader, mkPub, secret)
		if err != nil {
			t.Fatal(err)
		}
		return w
	}
	for _, tc := range []struct {
		name    string
		mk      identity.Key
		blob    func(t *testing.T) *identity.WrappedKey
		opts    identity.UnwrapOptions
		before  func(t *testing.T)
		wantErr error
	}{
		{name: "for this MK", mk: id.MK, blob: func(t *testing.T) *identity.WrappedKey { return wrap(t, id.MK.Public) }},
		{name: "for another MK", mk: id.MK, blob: func(t *testing.T) *identity.WrappedKey { return wrap(t, foreignMK(t)) }, wantErr: identity.ErrUnwrap},
		{name: "tampered duplicate", mk: id.MK, blob: func(t *testing.T) *identity.WrappedKey {
			w := wrap(t, id.MK.Public)
			w.Duplicate[len(w.Duplicate)-1] ^= 1
			return w
		}, wantErr: identity.ErrUnwrap},
		{name: "swapped public area", mk: id.MK, blob: func(t *testing.T) *identity.WrappedKey {
			w, other := wrap(t, id.MK.Public), wrap(t, id.MK.Public)
			w.Public = other.Public
			return w
		}, wantErr: identity.ErrUnwrap},
		{name: "truncated", mk: id.MK, blob: func(t *testing.T) *identity.WrappedKey {
			w := wrap(t, id.MK.Public)
			w.Seed = nil
			return w
		}, wantErr: identity.ErrBadBlob},
		{name: "PCR-bound MK, same boot state", mk: bound, opts: identity.UnwrapOptions{PolicyPCRs: []int{16}},
			blob: func(t *testing.T) *identity.WrappedKey { return wrap(t, bound.Public) }},
		{name: "PCR-bound MK without PolicyPCRs", mk: bound,
			blob: func(t *testing.T) *identity.WrappedKey { return wrap(t, bound.Public) }, wantErr: identity.ErrBadOptions},
		{name: "PCR-bound MK, PCR changed", mk: bound, opts: identity.UnwrapOptions{PolicyPCRs: []int{16}},
			before: func(t *testing.T) { extend(t, tpm, 16) },
			blob:   func(t *testing.T) *identity.WrappedKey { return wrap(t, bound.Public) }, wantErr: identity.ErrMKPolicy},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.before != nil {
				tc.before(t)
			}
			m := vtpm.NewMeter(tpm, vtpm.ProfileNone)
			got, err := identity.Unwrap(ctx, m, tc.mk, tc.blob(t), tc.opts)
			tpmtest.CheckNoLeaks(t, tpm)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("Unwrap = %v, want %v", err, tc.wantErr)
			}
			if err != nil {
				t.Logf("refusal: %v", err)
				return
			}
			t.Logf("unwrap: %d TPM commands (%s)", m.Stats().Total, m.Stats())
			if !bytes.Equal(got, secret) {
				t.Fatal("unwrapped secret differs")
			}
		})
	}
}

func TestWrapRefuses(t *testing.T) {
	t.Parallel()
	ak := foreignAK(t)
	mk := foreignMK(t)
	for _, tc := range []struct {
		name   string
		pub    []byte
		secret []byte
		want   error
	}{
		{"signing key", ak, make([]byte, 32), identity.ErrBadOptions},
		{"garbage public", []byte{1, 2, 3}, make([]byte, 32), identity.ErrBadBlob},
		{"empty secret", mk, nil, identity.ErrBadOptions},
		{"secret too large", mk, make([]byte, identity.MaxWrappedSecret+1), identity.ErrBadOptions},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := identity.Wrap(rand.Reader, tc.pub, tc.secret); !errors.Is(err, tc.want) {
				t.Fatalf("Wrap = %v, want %v", err, tc.want)
			}
		})
	}
}
