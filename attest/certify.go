package attest

import (
	"bytes"
	"crypto/subtle"
	"errors"
	"strings"

	"github.com/google/go-tpm/tpm2"
)

// MKPolicy is what the verifier requires of the migration key.
type MKPolicy struct {
	// AuthPolicy is the required authPolicy digest; empty means the key
	// must have an empty authPolicy.
	AuthPolicy []byte
}

// VerifyCertify checks the TPM2_Certify of the migration key by the AK:
// magic, type, AK signature, extraData == nonce, certified name == the name
// of mk's public area, and the key's shape: ECC P-256 restricted decrypt
// storage key with AES-128-CFB, fixedTPM, fixedParent, sensitiveDataOrigin,
// not a signing key, with the required authPolicy. Refusal rules:
// certify-signature, certify-nonce, mk-name, mk-attributes, mk-policy.
func VerifyCertify(ak, mk *Public, attestRaw, sigRaw, nonce []byte, pol MKPolicy) error {
	key, err := ak.CryptoKey()
	if err != nil {
		return refuse(RuleCertifySignature, "AK public key: %v", err)
	}
	att, err := decodeAttest(attestRaw, tpmSTAttestCertify)
	if err != nil {
		return &RefusalError{Rule: RuleCertifySignature, Detail: err.Error(), Cause: err}
	}
	if _, err := verifyTPMSignature(key, sigRaw, attestRaw); errors.Is(err, ErrSHA1Signature) {
		return &RefusalError{Rule: RuleCertifySignature, Detail: "the certification is signed with SHA-1, refused (SHA-1 is accepted on EK certificate paths only)", Cause: err}
	} else if err != nil {
		return refuse(RuleCertifySignature, "certification not signed by the AK: %v", err)
	}
	if subtle.ConstantTimeCompare(att.extraData, nonce) != 1 {
		return refuse(RuleCertifyNonce, "certify extraData %s, want the verifier's nonce %s", short(att.extraData), short(nonce))
	}
	name, err := mk.Name()
	if err != nil {
		return refuse(RuleMKName, "migration key: %v", err)
	}
	if !bytes.Equal(att.name, name) {
		return refuse(RuleMKName, "certified name %s, the migration key's public area has name %s", short(att.name), short(name))
	}
	if err := checkMKShape(mk.Pub); err != nil {
		return err
	}
	if !bytes.Equal(mk.Pub.AuthPolicy.Buffer, pol.AuthPolicy) {
		return refuse(RuleMKPolicy, "authPolicy %s, policy requires %s", short(mk.Pub.AuthPolicy.Buffer), short(pol.AuthPolicy))
	}
	return nil
}

func checkMKShape(p *tpm2.TPMTPublic) error {
	a := p.ObjectAttributes
	var bad []string
	need := func(ok bool, what string) {
		if !ok {
			bad = append(bad, what)
		}
	}
	need(a.FixedTPM, "fixedTPM clear")
	need(a.FixedParent, "fixedParent clear")
	need(a.SensitiveDataOrigin, "sensitiveDataOrigin clear")
	need(a.Restricted, "restricted clear")
	need(a.Decrypt, "decrypt clear")
	need(!a.SignEncrypt, "sign set")
	need(p.Type == tpm2.TPMAlgECC, "not an ECC key")
	if p.Type == tpm2.TPMAlgECC {
		if e, err := p.Parameters.ECCDetail(); err != nil {
			bad = append(bad, "no ECC parameters")
		} else {
			need(e.CurveID == tpm2.TPMECCNistP256, "curve is not NIST P-256")
			sym := e.Symmetric
			ok := sym.Algorithm == tpm2.TPMAlgAES
			if ok {
				bits, err1 := sym.KeyBits.AES()
				mode, err2 := sym.Mode.AES()
				ok = err1 == nil && err2 == nil && *bits == 128 && *mode == tpm2.TPMAlgCFB
			}
			need(ok, "symmetric is not AES-128-CFB")
		}
	}
	if len(bad) > 0 {
		return refuse(RuleMKAttributes, "migration key: %s", strings.Join(bad, ", "))
	}
	return nil
}
