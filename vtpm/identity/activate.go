package identity

import (
	"bytes"
	"context"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmm/vtpmm/attest"
)

// ActivateCredential answers a verifier's credential-activation challenge
// (attest.NewActivationChallenge for this host's EK and AK): the TPM runs
// TPM2_ActivateCredential with the AK (password) and the EK (a policy
// session with PolicySecret(endorsement), the EK template's policy; the
// session hash is the EK's nameAlg, SHA-384 for the P-384 EK) and returns
// the secret. It costs 4 TPM commands (StartAuthSession, PolicySecret,
// ActivateCredential, FlushContext).
//
// A challenge for another EK or AK is ErrChallengeMismatch (checked before
// the TPM is used); a blob the TPM refuses (made for another AK name or
// EK, or tampered with) is ErrActivation.
func ActivateCredential(ctx context.Context, tpm transport.TPM, id *Identity, ch *attest.ActivationChallenge) ([]byte, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if id == nil || ch == nil {
		return nil, fmt.Errorf("activate credential: %w: identity and challenge are required", ErrBadOptions)
	}
	if !bytes.Equal(ch.EKDigest, id.EK.Digest()) {
		return nil, fmt.Errorf("activate credential: %w: challenge for EK %x, this TPM's EK is %x", ErrChallengeMismatch, ch.EKDigest, id.EK.Digest())
	}
	if !bytes.Equal(ch.AKName, id.AK.Name) {
		return nil, fmt.Errorf("activate credential: %w: challenge for AK %x, this TPM's AK is %x", ErrChallengeMismatch, ch.AKName, id.AK.Name)
	}
	ekPub, err := id.EK.public()
	if err != nil {
		return nil, fmt.Errorf("activate credential: %w", err)
	}
	hash := ekPub.NameAlg
	sess, closeSess, err := tpm2.PolicySession(tpm, hash, 16)
	if err != nil {
		return nil, tpmError("activate credential: start EK policy session", err)
	}
	defer func() { _ = closeSess() }()
	_, err = tpm2.PolicySecret{
		AuthHandle:    tpm2.AuthHandle{Handle: tpm2.TPMRHEndorsement, Auth: tpm2.PasswordAuth(nil)},
		PolicySession: sess.Handle(),
		NonceTPM:      sess.NonceTPM(),
	}.Execute(tpm)
	if err != nil {
		return nil, tpmError("activate credential: PolicySecret(endorsement)", err)
	}
	rsp, err := tpm2.ActivateCredential{
		ActivateHandle: id.AK.auth(),
		KeyHandle:      tpm2.AuthHandle{Handle: id.EK.Handle, Name: tpm2.TPM2BName{Buffer: id.EK.Name}, Auth: sess},
		CredentialBlob: tpm2.TPM2BIDObject{Buffer: ch.CredentialBlob},
		Secret:         tpm2.TPM2BEncryptedSecret{Buffer: ch.EncryptedSecret},
	}.Execute(tpm)
	if err != nil {
		if isIntegrity(err) {
			return nil, fmt.Errorf("activate credential: %w: %w", ErrActivation, err)
		}
		return nil, tpmError("activate credential", err)
	}
	return rsp.CertInfo.Buffer, nil
}

// isIntegrity reports TPM errors that mean "this blob was not made for
// this key": integrity (HMAC), a seed or point the key cannot decrypt, or
// a bad size after decryption.
func isIntegrity(err error) bool {
	for _, rc := range []tpm2.TPMRC{tpm2.TPMRCIntegrity, tpm2.TPMRCValue, tpm2.TPMRCSize, tpm2.TPMRCECCPoint, tpm2.TPMRCScheme} {
		if errors.Is(err, rc) {
			return true
		}
	}
	return false
}
