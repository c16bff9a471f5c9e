package identity_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"errors"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/vtpmm/vtpmm/attest"
	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/identity"
	"github.com/vtpmm/vtpmm/vtpm/tpmtest"
)

// foreignAK is the public area of an AK-shaped key that is not in the TPM.
func foreignAK(t testing.TB) []byte {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	p := identity.AKTemplate
	p.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
		X: tpm2.TPM2BECCParameter{Buffer: k.X.FillBytes(make([]byte, 32))},
		Y: tpm2.TPM2BECCParameter{Buffer: k.Y.FillBytes(make([]byte, 32))},
	})
	return tpm2.Marshal(p)
}

func TestActivateCredential(t *testing.T) {
	t.Parallel()
	_, tpm := tpmtest.NewHost(t)
	ctx := context.Background()
	if _, err := identity.Provision(ctx, tpm, identity.ProvisionOptions{}); err != nil {
		t.Fatal(err)
	}
	now := time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC)
	for _, kind := range []identity.EKKind{identity.EKRSA, identity.EKECC} {
		t.Run(kind.String(), func(t *testing.T) {
			id, err := identity.LoadIdentity(ctx, tpm, identity.LoadOptions{EKKind: kind})
			if err != nil {
				t.Fatal(err)
			}
			for _, tc := range []struct {
				name    string
				akPub   []byte                               // the AK the verifier makes the challenge for
				tamper  func(ch *attest.ActivationChallenge) // after making the challenge
				wantErr error                                // from ActivateCredential
			}{
				{name: "own AK", akPub: id.AK.Public},
				{name: "another AK", akPub: foreignAK(t), wantErr: identity.ErrChallengeMismatch},
				// The challenge claims our AK's name but the blob binds the
				// credential to another AK: only the TPM can tell.
				{name: "blob bound to another AK name", akPub: foreignAK(t),
					tamper: func(ch *attest.ActivationChallenge) { ch.AKName = id.AK.Name }, wantErr: identity.ErrActivation},
				{name: "tampered blob", akPub: id.AK.Public,
					tamper: func(ch *attest.ActivationChallenge) { ch.CredentialBlob[len(ch.CredentialBlob)-1] ^= 1 }, wantErr: identity.ErrActivation},
			} {
				t.Run(tc.name, func(t *testing.T) {
					ch, err := attest.NewActivationChallenge(rand.Reader, id.EK.Public, tc.akPub)
					if err != nil {
						t.Fatal(err)
					}
					if tc.tamper != nil {
						tc.tamper(ch)
					}
					m := vtpm.NewMeter(tpm, vtpm.ProfileNone)
					answer, err := identity.ActivateCredential(ctx, m, id, ch)
					if !errors.Is(err, tc.wantErr) {
						t.Fatalf("ActivateCredential = %v, want %v", err, tc.wantErr)
					}
					tpmtest.CheckNoLeaks(t, tpm)
					if err != nil {
						t.Logf("refusal: %v", err)
						if err := attest.VerifyActivation(ch, answer); !errors.Is(err, attest.ErrAKNotActivated) {
							t.Errorf("VerifyActivation of no answer = %v", err)
						}
						return
					}
					t.Logf("activation: %d TPM commands (%s)", m.Stats().Total, m.Stats())
					if err := attest.VerifyActivation(ch, answer); err != nil {
						t.Fatal(err)
					}
					enr := &attest.MemoryEnrollments{}
					if err := enr.Add(ctx, ch.Enrollment("host-a", now)); err != nil {
						t.Fatal(err)
					}
					if ok, err := enr.Activated(ctx, id.EK.Digest(), id.AK.Name); err != nil || !ok {
						t.Errorf("enrolment not recorded: %v %v", ok, err)
					}
				})
			}
		})
	}
}
