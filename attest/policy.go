package attest

import (
	"bytes"
	"fmt"
	"os"
	"sort"
	"strconv"
	"time"

	"gopkg.in/yaml.v3"
)

// PolicyVersion is the only policy format version.
const PolicyVersion = 1

// Policy is the operator's attestation policy. It is read from YAML (JSON
// is accepted too, being a subset). See docs/attestation.md for an example.
type Policy struct {
	Version int `yaml:"version" json:"version"`
	// Quote names the PCRs the quote must cover (and the producer quotes).
	Quote QuotePolicy `yaml:"quote" json:"quote"`
	// GoldenPCRs: bank → PCR index → acceptable values (one or a list).
	GoldenPCRs map[Bank]map[string]HexList `yaml:"golden_pcrs,omitempty" json:"golden_pcrs,omitempty"`
	EventLog   EventLogPolicy              `yaml:"event_log" json:"event_log"`
	EK         CertPolicy                  `yaml:"ek" json:"ek"`
	MK         MKPolicyFile                `yaml:"migration_key" json:"migration_key"`
	// Enrollment says how hosts may be enrolled: by credential activation
	// against the EK (default), on an AK certificate, or either.
	Enrollment EnrollmentMode `yaml:"enrollment,omitempty" json:"enrollment,omitempty"`
	// AKCert is the AK certificate policy (enrollment ak-certificate or
	// either).
	AKCert AKCertPolicy `yaml:"ak_certificate,omitempty" json:"ak_certificate,omitempty"`
	// MaxEvidenceAge bounds now - evidence.produced_at (0: not checked).
	MaxEvidenceAge time.Duration `yaml:"max_evidence_age" json:"max_evidence_age"`
}

// QuotePolicy selects the quoted PCRs.
type QuotePolicy struct {
	Bank Bank  `yaml:"bank" json:"bank"`
	PCRs []int `yaml:"pcrs" json:"pcrs"`
}

// EventLogPolicy holds the event-log rules.
type EventLogPolicy struct {
	// Required refuses evidence without an event log.
	Required bool `yaml:"required" json:"required"`
	// RequireSecureBoot requires the SecureBoot variable measured in PCR 7
	// to be 1.
	RequireSecureBoot bool `yaml:"require_secure_boot" json:"require_secure_boot"`
	// AllowedBootComponents, when non-empty, lists the only acceptable
	// digests (any bank) of EV_EFI_BOOT_SERVICES_APPLICATION events in PCR 4.
	AllowedBootComponents []HexBytes `yaml:"allowed_boot_components,omitempty" json:"allowed_boot_components,omitempty"`
}

// EnrollmentMode is the policy's enrolment method.
type EnrollmentMode string

// Enrolment modes. The empty mode is EnrollActivation.
const (
	// EnrollActivation: the verifier challenges the AK with credential
	// activation against the EK (TPM2_ActivateCredential).
	EnrollActivation EnrollmentMode = "activation"
	// EnrollAKCertificate: the host presents an AK certificate (an IAK
	// from its manufacturer, or an enterprise CA's) that chains to one of
	// the verifier's AK roots; no activation round trip.
	EnrollAKCertificate EnrollmentMode = "ak-certificate"
	// EnrollEither accepts both.
	EnrollEither EnrollmentMode = "either"
)

// Allows reports whether an enrolment made by method (MethodActivation or
// MethodAKCertificate; "" is an activation) is acceptable under m.
func (m EnrollmentMode) Allows(method string) bool {
	if method == "" {
		method = MethodActivation
	}
	switch m {
	case "", EnrollActivation:
		return method == MethodActivation
	case EnrollAKCertificate:
		return method == MethodAKCertificate
	case EnrollEither:
		return method == MethodActivation || method == MethodAKCertificate
	}
	return false
}

func (m EnrollmentMode) String() string {
	if m == "" {
		return string(EnrollActivation)
	}
	return string(m)
}

// AKCertPolicy is the AK certificate section of the policy file.
type AKCertPolicy struct {
	// RequireEKBinding refuses an AK certificate that does not name the
	// EK (a TCG EK permanent identifier in its subjectAltName). By
	// default such a certificate is accepted with a warning: the AK CA
	// then vouches that the AK is a TPM key, but not of which TPM.
	RequireEKBinding bool `yaml:"require_ek_binding" json:"require_ek_binding"`
	// SkipValidity does not enforce notBefore/notAfter on the AK
	// certificate path (enforced by default: unlike EK certificates,
	// enterprise AK certificates are meant to expire).
	SkipValidity bool `yaml:"skip_validity" json:"skip_validity"`
}

// MKPolicyFile is the migration-key section of the policy file.
type MKPolicyFile struct {
	// AuthPolicy is the required authPolicy digest (hex); empty requires
	// an empty authPolicy.
	AuthPolicy HexBytes `yaml:"auth_policy" json:"auth_policy"`
}

// HexList is one or more hex values (YAML scalar or sequence).
type HexList []HexBytes

// UnmarshalYAML accepts a scalar or a sequence of hex strings.
func (l *HexList) UnmarshalYAML(n *yaml.Node) error {
	var items []string
	switch n.Kind {
	case yaml.ScalarNode:
		items = []string{n.Value}
	case yaml.SequenceNode:
		if err := n.Decode(&items); err != nil {
			return err
		}
	default:
		return fmt.Errorf("line %d: want a hex string or a list of them", n.Line)
	}
	for _, s := range items {
		var h HexBytes
		if err := h.UnmarshalText([]byte(s)); err != nil {
			return fmt.Errorf("line %d: %w", n.Line, err)
		}
		*l = append(*l, h)
	}
	return nil
}

// UnmarshalYAML decodes HexBytes from a hex scalar.
func (h *HexBytes) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.ScalarNode {
		return fmt.Errorf("line %d: want a hex string", n.Line)
	}
	return h.UnmarshalText([]byte(n.Value))
}

// MarshalYAML encodes HexBytes as a hex string.
func (h HexBytes) MarshalYAML() (any, error) { return fmt.Sprintf("%x", []byte(h)), nil }

// LoadPolicy reads and validates a policy file.
func LoadPolicy(path string) (*Policy, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalidPolicy, err)
	}
	return ParsePolicy(data)
}

// ParsePolicy parses and validates a YAML or JSON policy. Unknown keys are
// errors.
func ParsePolicy(data []byte) (*Policy, error) {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	var p Policy
	if err := dec.Decode(&p); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalidPolicy, err)
	}
	if err := p.Validate(); err != nil {
		return nil, err
	}
	return &p, nil
}

// Validate checks the policy.
func (p *Policy) Validate() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: %s", ErrInvalidPolicy, fmt.Sprintf(format, args...))
	}
	if p.Version != PolicyVersion {
		return bad("version %d, want %d", p.Version, PolicyVersion)
	}
	if _, ok := p.Quote.Bank.Hash(); !ok {
		return bad("quote.bank %q unknown", p.Quote.Bank)
	}
	if len(p.Quote.PCRs) == 0 {
		return bad("quote.pcrs is empty")
	}
	for _, i := range p.Quote.PCRs {
		if i < 0 || i > 23 {
			return bad("quote.pcrs: %d out of range", i)
		}
	}
	for bank, m := range p.GoldenPCRs {
		h, ok := bank.Hash()
		if !ok {
			return bad("golden_pcrs: bank %q unknown", bank)
		}
		for k, vals := range m {
			i, err := strconv.Atoi(k)
			if err != nil || i < 0 || i > 23 {
				return bad("golden_pcrs.%s: PCR %q out of range", bank, k)
			}
			if len(vals) == 0 {
				return bad("golden_pcrs.%s.%d: no value", bank, i)
			}
			for _, v := range vals {
				if len(v) != h.Size() {
					return bad("golden_pcrs.%s.%d: %d bytes, want %d", bank, i, len(v), h.Size())
				}
			}
		}
	}
	if p.MaxEvidenceAge < 0 {
		return bad("max_evidence_age is negative")
	}
	switch p.Enrollment {
	case "", EnrollActivation, EnrollAKCertificate, EnrollEither:
	default:
		return bad("enrollment %q: want activation, ak-certificate or either", p.Enrollment)
	}
	return nil
}

// Deprecations lists the deprecated settings the policy uses, with what to
// do instead. Callers print or log them when they load a policy.
func (p *Policy) Deprecations() []string {
	var out []string
	if p.EK.AllowSHA1 != nil {
		out = append(out, fmt.Sprintf("ek.allow_sha1: %v is deprecated and has no effect: SHA-1-signed EK chains (ST33, NPCT6xx, TPM 1.2-era Infineon) are accepted by default with a warning; set ek.strict: true to refuse them", *p.EK.AllowSHA1))
	}
	return out
}

// Marshal encodes the policy as YAML.
func (p *Policy) Marshal() ([]byte, error) { return yaml.Marshal(p) }

// GoldenFromEventLog builds a policy from a known-good event log: the
// replayed values of pcrs in bank become the golden values, the PCR 4 boot
// applications become the allowed boot components, and Secure Boot is
// required if the log shows it on.
func GoldenFromEventLog(log *EventLog, bank Bank, pcrs []int) (*Policy, error) {
	vals := log.Replay()[bank]
	if vals == nil {
		return nil, fmt.Errorf("%w: the log has no %s bank", ErrInvalidPolicy, bank)
	}
	facts, err := log.Facts()
	if err != nil {
		return nil, err
	}
	p := &Policy{
		Version:        PolicyVersion,
		Quote:          QuotePolicy{Bank: bank, PCRs: append([]int(nil), pcrs...)},
		GoldenPCRs:     map[Bank]map[string]HexList{bank: {}},
		EventLog:       EventLogPolicy{Required: true},
		MaxEvidenceAge: 5 * time.Minute,
	}
	sort.Ints(p.Quote.PCRs)
	for _, i := range pcrs {
		if v, ok := vals[i]; ok {
			p.GoldenPCRs[bank][strconv.Itoa(i)] = HexList{v}
		}
	}
	p.EventLog.RequireSecureBoot = facts.SecureBoot != nil && *facts.SecureBoot
	for _, ev := range facts.BootComponents {
		if d, ok := ev.Digests[bank]; ok {
			p.EventLog.AllowedBootComponents = append(p.EventLog.AllowedBootComponents, d)
		}
	}
	return p, p.Validate()
}
