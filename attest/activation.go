package attest

import (
	"crypto/subtle"
	"fmt"
	"io"
	"time"

	"github.com/google/go-tpm/tpm2"
)

// activationSecretSize is the credential size: the EK nameAlg digest size
// (SHA-256) bounds it.
const activationSecretSize = 32

// ActivationChallenge is the credential-activation challenge for one
// (EK, AK) pair. The exported fields go to the host, whose TPM runs
// TPM2_ActivateCredential(AK, EK, CredentialBlob, EncryptedSecret); the
// secret stays with the verifier (it is not serialised).
type ActivationChallenge struct {
	CredentialBlob  []byte `json:"credential_blob"`  // TPM2B_ID_OBJECT contents
	EncryptedSecret []byte `json:"encrypted_secret"` // TPM2B_ENCRYPTED_SECRET contents
	EKDigest        []byte `json:"ek_digest"`        // SHA-256 of the EK TPMT_PUBLIC
	AKName          []byte `json:"ak_name"`

	secret []byte
}

// NewActivationChallenge makes a challenge that only the TPM holding the EK
// (RSA-2048 or ECC encapsulation key) can answer, and only for an AK with
// this name loaded in the same TPM. ekPub and akPub are TPMT_PUBLIC bytes.
// The AK must be a restricted signing key.
func NewActivationChallenge(rand io.Reader, ekPub, akPub []byte) (*ActivationChallenge, error) {
	ek, err := ParsePublic("EK", ekPub)
	if err != nil {
		return nil, err
	}
	ak, err := ParsePublic("AK", akPub)
	if err != nil {
		return nil, err
	}
	if err := CheckAK(ak); err != nil {
		return nil, err
	}
	encap, err := tpm2.ImportEncapsulationKey(ek.Pub)
	if err != nil {
		return nil, fmt.Errorf("EK cannot encapsulate: %w", err)
	}
	name, err := ak.Name()
	if err != nil {
		return nil, err
	}
	secret := make([]byte, activationSecretSize)
	if _, err := io.ReadFull(rand, secret); err != nil {
		return nil, fmt.Errorf("activation secret: %w", err)
	}
	blob, enc, err := tpm2.CreateCredential(rand, encap, name, secret)
	if err != nil {
		return nil, fmt.Errorf("create credential: %w", err)
	}
	return &ActivationChallenge{CredentialBlob: blob, EncryptedSecret: enc, EKDigest: ek.Digest(), AKName: name, secret: secret}, nil
}

// VerifyActivation compares the host's answer (the secret its TPM
// recovered) with the challenge's secret in constant time.
func VerifyActivation(ch *ActivationChallenge, answer []byte) error {
	if ch == nil || len(ch.secret) == 0 {
		return refuse(RuleAKActivation, "no pending activation challenge")
	}
	if subtle.ConstantTimeCompare(ch.secret, answer) != 1 {
		return refuse(RuleAKActivation, "activation answer does not match: the AK %s is not in the TPM of EK %s", short(ch.AKName), short(ch.EKDigest))
	}
	return nil
}

// Enrollment returns the record to store after a successful activation.
func (ch *ActivationChallenge) Enrollment(host string, now time.Time) Enrollment {
	return Enrollment{Host: host, EKDigest: ch.EKDigest, AKName: ch.AKName, EnrolledAt: now.UTC(), Method: MethodActivation}
}
