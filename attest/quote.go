package attest

import (
	"bytes"
	"crypto/subtle"
	"errors"
	"fmt"
	"strings"

	"github.com/google/go-tpm/tpm2"
)

// QuoteResult describes a verified quote.
type QuoteResult struct {
	Selections []pcrSelection
	Clock      uint64
	ResetCount uint32
}

// Covers reports whether the quote covers PCR i of bank.
func (q *QuoteResult) Covers(bank Bank, i int) bool {
	for _, s := range q.Selections {
		if s.Bank != bank {
			continue
		}
		for _, p := range s.PCRs {
			if p == i {
				return true
			}
		}
	}
	return false
}

func (q *QuoteResult) String() string {
	var parts []string
	for _, s := range q.Selections {
		parts = append(parts, fmt.Sprintf("%s%v", s.Bank, s.PCRs))
	}
	return strings.Join(parts, " ")
}

// CheckAK refuses an AK that is not a restricted signing key fixed to its
// TPM: only such a key guarantees that a TPMS_ATTEST it signed was produced
// by the TPM (the TPM refuses to sign external data starting with the
// TPM_GENERATED magic with a restricted key).
func CheckAK(ak *Public) error {
	a := ak.Pub.ObjectAttributes
	var bad []string
	if !a.FixedTPM {
		bad = append(bad, "fixedTPM clear")
	}
	if !a.Restricted {
		bad = append(bad, "restricted clear")
	}
	if !a.SignEncrypt {
		bad = append(bad, "sign clear")
	}
	if a.Decrypt {
		bad = append(bad, "decrypt set")
	}
	if len(bad) > 0 {
		return refuse(RuleAKAttributes, "AK attributes: %s", strings.Join(bad, ", "))
	}
	if _, err := ak.CryptoKey(); err != nil {
		return refuse(RuleAKAttributes, "AK public key: %v", err)
	}
	return nil
}

// VerifyQuote checks one TPM2_Quote: the AK signature over the TPMS_ATTEST,
// magic and type, extraData == nonce, and that pcrDigest equals the hash
// (with the signature's hash algorithm) of the selected PCR values taken
// from pcrs, in selection order. Refusal rules: quote-signature,
// quote-nonce, pcr-digest.
func VerifyQuote(ak *Public, attestRaw, sigRaw, nonce []byte, pcrs PCRValues) (*QuoteResult, error) {
	key, err := ak.CryptoKey()
	if err != nil {
		return nil, refuse(RuleQuoteSignature, "AK public key: %v", err)
	}
	att, err := decodeAttest(attestRaw, tpmSTAttestQuote)
	if err != nil {
		return nil, &RefusalError{Rule: RuleQuoteSignature, Detail: err.Error(), Cause: err}
	}
	h, err := verifyTPMSignature(key, sigRaw, attestRaw)
	if errors.Is(err, ErrSHA1Signature) {
		return nil, &RefusalError{Rule: RuleQuoteSignature, Detail: "the quote is signed with SHA-1, refused (SHA-1 is accepted on EK certificate paths only)", Cause: err}
	}
	if err != nil {
		return nil, refuse(RuleQuoteSignature, "quote not signed by the AK: %v", err)
	}
	if subtle.ConstantTimeCompare(att.extraData, nonce) != 1 {
		return nil, refuse(RuleQuoteNonce, "quote extraData %s, want the verifier's nonce %s", short(att.extraData), short(nonce))
	}
	if att.selErr != nil {
		return nil, refuse(RulePCRDigest, "%v", att.selErr)
	}
	hh := h.New()
	for _, s := range att.sels {
		for _, i := range s.PCRs {
			v, ok := pcrs[s.Bank][i]
			if !ok {
				return nil, refuse(RulePCRDigest, "quoted %s PCR %d has no value in the evidence", s.Bank, i)
			}
			hh.Write(v)
		}
	}
	if got := hh.Sum(nil); !bytes.Equal(got, att.pcrDigest) {
		return nil, refuse(RulePCRDigest, "pcrDigest %s, the PCR values hash to %s", short(att.pcrDigest), short(got))
	}
	return &QuoteResult{Selections: att.sels, Clock: att.clock, ResetCount: att.resetCount}, nil
}

// short renders a digest as its first 6 bytes in hex.
func short(b []byte) string {
	if len(b) == 0 {
		return "(empty)"
	}
	if len(b) > 6 {
		return fmt.Sprintf("%x..", b[:6])
	}
	return fmt.Sprintf("%x", b)
}

// bankAlg returns the TPM algorithm of a bank.
func bankAlg(b Bank) tpm2.TPMAlgID {
	switch b {
	case "sha1":
		return tpm2.TPMAlgSHA1
	case "sha256":
		return tpm2.TPMAlgSHA256
	case "sha384":
		return tpm2.TPMAlgSHA384
	case "sha512":
		return tpm2.TPMAlgSHA512
	}
	return tpm2.TPMAlgNull
}
