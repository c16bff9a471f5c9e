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
// TPM2_ActivateCredential with the AK (password, ADMIN role) and the EK
// (USER role) and returns the secret. The low-range EK templates (RSA-2048
// at 0x81010001, ECC P-256) clear userWithAuth, so the EK is authorized by
// a policy session with PolicySecret(endorsement): 4 TPM commands
// (StartAuthSession, PolicySecret, ActivateCredential, FlushContext). The
// high-range templates (swtpm's ECC P-384 EK at 0x81010016) set
// userWithAuth (their authPolicy is the TCG PolicyB, an OR), so the EK's
// empty auth value is used: 1 TPM command.
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
	var ekAuth tpm2.Session = tpm2.PasswordAuth(nil)
	if !ekPub.ObjectAttributes.UserWithAuth {
		// Low-range EK templates (RSA-2048, ECC P-256) clear userWithAuth:
		// the USER role needs PolicySecret(endorsement), in the EK's nameAlg.
		sess, closeSess, err := tpm2.PolicySession(tpm, ekPub.NameAlg, 16)
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
		ekAuth = sess
	}
	rsp, err := tpm2.ActivateCredential{
		ActivateHandle: id.AK.auth(),
		KeyHandle:      tpm2.AuthHandle{Handle: id.EK.Handle, Name: tpm2.TPM2BName{Buffer: id.EK.Name}, Auth: ekAuth},
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
