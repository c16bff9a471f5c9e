package attest

import (
	"errors"
	"fmt"
)

// Rule names one verification rule. The names are stable: they appear in
// refusal messages, in --explain output and in docs/attestation.md.
type Rule string

// The verification rules, in the order the Verifier applies them.
const (
	RuleEvidenceFormat   Rule = "evidence-format"
	RuleNonce            Rule = "nonce"
	RuleEvidenceAge      Rule = "evidence-age"
	RuleEKChain          Rule = "ek-chain"
	RuleEKSignature      Rule = "ek-signature"
	RuleEKValidity       Rule = "ek-validity"
	RuleEKPublic         Rule = "ek-public"
	RuleAKAttributes     Rule = "ak-attributes"
	RuleAKActivation     Rule = "ak-activation"
	RuleEnrollmentMethod Rule = "enrollment-method"
	RuleAKCertChain      Rule = "ak-cert-chain"
	RuleAKCertSignature  Rule = "ak-cert-signature"
	RuleAKCertValidity   Rule = "ak-cert-validity"
	RuleAKCertKey        Rule = "ak-cert-key"
	RuleAKCertUsage      Rule = "ak-cert-usage"
	RuleAKCertBinding    Rule = "ak-cert-binding"
	RuleCertifySignature Rule = "certify-signature"
	RuleCertifyNonce     Rule = "certify-nonce"
	RuleMKName           Rule = "mk-name"
	RuleMKAttributes     Rule = "mk-attributes"
	RuleMKPolicy         Rule = "mk-policy"
	RuleQuoteSignature   Rule = "quote-signature"
	RuleQuoteNonce       Rule = "quote-nonce"
	RulePCRDigest        Rule = "pcr-digest"
	RulePCRSelection     Rule = "pcr-selection"
	RulePCRPolicy        Rule = "pcr-policy"
	RuleEventLogReplay   Rule = "eventlog-replay"
	RuleSecureBoot       Rule = "secure-boot"
	RuleBootComponent    Rule = "boot-component"
)

// Sentinel errors, one per rule (a few rules share one). Match with errors.Is.
var (
	ErrMalformedEvidence = errors.New("malformed evidence")
	ErrUnknownVersion    = errors.New("unknown evidence version")
	ErrStaleEvidence     = errors.New("stale or replayed evidence")
	ErrEKUntrustedRoot   = errors.New("EK certificate does not chain to a trusted root")
	ErrEKSignature       = errors.New("EK certificate chain signature invalid")
	ErrEKExpired         = errors.New("EK certificate chain outside its validity period")
	ErrEKMismatch        = errors.New("EK certificate does not match the EK public area")
	ErrAKAttributes      = errors.New("AK is not a restricted TPM signing key")
	ErrAKNotActivated    = errors.New("AK was never activated with this EK")
	ErrEnrollmentMethod  = errors.New("enrolment method not allowed by policy")
	ErrAKCertUntrusted   = errors.New("AK certificate does not chain to a trusted AK root")
	ErrAKCertSignature   = errors.New("AK certificate chain signature invalid")
	ErrAKCertExpired     = errors.New("AK certificate chain outside its validity period")
	ErrAKCertMismatch    = errors.New("AK certificate does not certify the AK")
	ErrAKCertUsage       = errors.New("AK certificate usage does not fit a restricted signing key")
	ErrAKCertBinding     = errors.New("AK certificate is not bound to the EK")
	ErrCertifySignature  = errors.New("migration-key certification signature invalid")
	ErrCertifyNonce      = errors.New("migration-key certification nonce mismatch")
	ErrMKName            = errors.New("certified name does not match the migration key")
	ErrMKAttributes      = errors.New("migration key attributes not acceptable")
	ErrMKPolicy          = errors.New("migration key authPolicy not acceptable")
	ErrQuoteSignature    = errors.New("quote signature invalid")
	ErrQuoteNonce        = errors.New("quote nonce mismatch")
	ErrPCRDigest         = errors.New("quoted PCR digest does not match the PCR values")
	ErrPCRSelection      = errors.New("quote does not cover the PCRs required by policy")
	ErrPCRPolicy         = errors.New("PCR value differs from policy")
	ErrEventLogReplay    = errors.New("event log does not replay to the quoted PCRs")
	ErrSecureBootOff     = errors.New("secure boot is not enabled")
	ErrBootComponent     = errors.New("boot component not allowed by policy")

	// Errors that are not refusals of a host but of an input file.
	ErrMalformedCertificate = errors.New("malformed certificate")
	ErrMalformedEventLog    = errors.New("malformed event log")
	ErrMalformedTPMStruct   = errors.New("malformed TPM structure")
	ErrInvalidPolicy        = errors.New("invalid policy")
	// ErrSHA1Signature is a TPM signature (quote, certification) made with
	// SHA-1: refused, SHA-1 is accepted on EK certificate paths only.
	ErrSHA1Signature = errors.New("SHA-1 signature refused: SHA-1 is accepted on EK certificate paths only")
)

// ruleSentinel maps each rule to the sentinel its RefusalError unwraps to.
func ruleSentinel(r Rule) error {
	switch r {
	case RuleEvidenceFormat:
		return ErrMalformedEvidence
	case RuleNonce, RuleEvidenceAge:
		return ErrStaleEvidence
	case RuleEKChain:
		return ErrEKUntrustedRoot
	case RuleEKSignature:
		return ErrEKSignature
	case RuleEKValidity:
		return ErrEKExpired
	case RuleEKPublic:
		return ErrEKMismatch
	case RuleAKAttributes:
		return ErrAKAttributes
	case RuleAKActivation:
		return ErrAKNotActivated
	case RuleEnrollmentMethod:
		return ErrEnrollmentMethod
	case RuleAKCertChain:
		return ErrAKCertUntrusted
	case RuleAKCertSignature:
		return ErrAKCertSignature
	case RuleAKCertValidity:
		return ErrAKCertExpired
	case RuleAKCertKey:
		return ErrAKCertMismatch
	case RuleAKCertUsage:
		return ErrAKCertUsage
	case RuleAKCertBinding:
		return ErrAKCertBinding
	case RuleCertifySignature:
		return ErrCertifySignature
	case RuleCertifyNonce:
		return ErrCertifyNonce
	case RuleMKName:
		return ErrMKName
	case RuleMKAttributes:
		return ErrMKAttributes
	case RuleMKPolicy:
		return ErrMKPolicy
	case RuleQuoteSignature:
		return ErrQuoteSignature
	case RuleQuoteNonce:
		return ErrQuoteNonce
	case RulePCRDigest:
		return ErrPCRDigest
	case RulePCRSelection:
		return ErrPCRSelection
	case RulePCRPolicy:
		return ErrPCRPolicy
	case RuleEventLogReplay:
		return ErrEventLogReplay
	case RuleSecureBoot:
		return ErrSecureBootOff
	case RuleBootComponent:
		return ErrBootComponent
	}
	return ErrMalformedEvidence
}

// RefusalError is returned for every refusal. Its message names the host and
// the rule; it unwraps to the rule's sentinel and, when set, to Cause.
type RefusalError struct {
	Host   string
	Rule   Rule
	Detail string
	Cause  error // optional underlying error (e.g. ErrUnknownVersion)
}

func (e *RefusalError) Error() string {
	if e.Host == "" {
		return fmt.Sprintf("rule %s: %s", e.Rule, e.Detail)
	}
	return fmt.Sprintf("%s: rule %s: %s", e.Host, e.Rule, e.Detail)
}

// Unwrap returns the rule's sentinel and the cause, if any.
func (e *RefusalError) Unwrap() []error {
	if e.Cause != nil {
		return []error{ruleSentinel(e.Rule), e.Cause}
	}
	return []error{ruleSentinel(e.Rule)}
}

func refuse(rule Rule, format string, args ...any) *RefusalError {
	return &RefusalError{Rule: rule, Detail: fmt.Sprintf(format, args...)}
}

// withHost sets the host of a RefusalError inside err (if any) and returns err.
func withHost(err error, host string) error {
	var re *RefusalError
	if errors.As(err, &re) && re.Host == "" {
		re.Host = host
	}
	return err
}
