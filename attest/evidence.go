package attest

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"time"
	"unicode"
)

// Evidence format identification and limits.
const (
	EvidenceFormat = "vtpmm-evidence"
	// EvidenceVersion is the version of evidence without an AK
	// certificate; such evidence is still encoded as version 1, so older
	// verifiers keep reading it.
	EvidenceVersion = 1
	// EvidenceVersionAKCert is the version that adds the optional
	// ak_cert and ak_intermediates fields; Encode uses it only when the
	// evidence carries an AK certificate.
	EvidenceVersionAKCert = 2
	// MaxEvidenceVersion is the newest version this verifier decodes.
	MaxEvidenceVersion = EvidenceVersionAKCert

	MaxEvidenceSize = 24 << 20 // an event log is at most 16 MiB, base64 adds a third
	MinNonceSize    = 16
	MaxNonceSize    = 32
	maxQuotes       = 4
	maxHostIDLen    = 253
)

// HexBytes is a byte string that encodes as lower-case hex in JSON and YAML.
type HexBytes []byte

// MarshalText implements encoding.TextMarshaler.
func (h HexBytes) MarshalText() ([]byte, error) { return []byte(hex.EncodeToString(h)), nil }

// UnmarshalText implements encoding.TextUnmarshaler.
func (h *HexBytes) UnmarshalText(b []byte) error {
	d, err := hex.DecodeString(string(b))
	if err != nil {
		return fmt.Errorf("hex: %w", err)
	}
	*h = d
	return nil
}

// QuoteBlob is one TPM2_Quote: the TPMS_ATTEST the TPM produced and its
// TPMT_SIGNATURE by the AK. A TPM quotes one or more banks per call.
type QuoteBlob struct {
	Attest    []byte `json:"attest"`
	Signature []byte `json:"signature"`
}

// Evidence is what a destination host sends to prove it may receive keys.
// It is produced by the TPM-holding side (vtpm) for the verifier's nonce.
// Binary fields are base64 in JSON; PCR values are hex.
type Evidence struct {
	Format  string `json:"format"`  // always EvidenceFormat
	Version int    `json:"version"` // EvidenceVersion
	HostID  string `json:"host_id"`
	Nonce   []byte `json:"nonce"` // the verifier's nonce, 16..32 bytes

	EKCert          []byte   `json:"ek_cert,omitempty"`          // DER; absent when the EK is enrolled
	EKIntermediates [][]byte `json:"ek_intermediates,omitempty"` // DER, untrusted path helpers
	EKPublic        []byte   `json:"ek_public"`                  // TPMT_PUBLIC
	AKPublic        []byte   `json:"ak_public"`                  // TPMT_PUBLIC
	MKPublic        []byte   `json:"mk_public"`                  // TPMT_PUBLIC
	MKCertifyInfo   []byte   `json:"mk_certify_info"`            // TPMS_ATTEST (TPM_ST_ATTEST_CERTIFY)
	MKCertifySig    []byte   `json:"mk_certify_signature"`       // TPMT_SIGNATURE

	// AKCert is the AK certificate (DER), version 2 only: an IAK
	// certificate from the TPM or platform manufacturer, or an enterprise
	// CA's AK certificate. AKIntermediates help build its path (untrusted).
	AKCert          []byte   `json:"ak_cert,omitempty"`
	AKIntermediates [][]byte `json:"ak_intermediates,omitempty"`

	Quotes   []QuoteBlob                  `json:"quotes"`
	PCRs     map[Bank]map[string]HexBytes `json:"pcrs"` // bank → PCR index → value
	EventLog []byte                       `json:"event_log,omitempty"`

	ProducedAt time.Time `json:"produced_at"`
}

// PCRValues returns the PCRs as bank → index → value. Call Validate first.
func (e *Evidence) PCRValues() PCRValues {
	out := PCRValues{}
	for bank, m := range e.PCRs {
		out[bank] = map[int][]byte{}
		for k, v := range m {
			i, _ := strconv.Atoi(k)
			out[bank][i] = v
		}
	}
	return out
}

// SetPCRValues stores v in the evidence.
func (e *Evidence) SetPCRValues(v PCRValues) {
	e.PCRs = map[Bank]map[string]HexBytes{}
	for bank, m := range v {
		e.PCRs[bank] = map[string]HexBytes{}
		for i, d := range m {
			e.PCRs[bank][strconv.Itoa(i)] = d
		}
	}
}

// MinVersion is the lowest evidence version that can carry e: 2 when it
// has an AK certificate, 1 otherwise.
func (e *Evidence) MinVersion() int {
	if len(e.AKCert) > 0 || len(e.AKIntermediates) > 0 {
		return EvidenceVersionAKCert
	}
	return EvidenceVersion
}

// Encode writes the evidence as JSON, with the lowest version that carries
// it (version 1 unless it has an AK certificate).
func (e *Evidence) Encode() ([]byte, error) {
	c := *e
	c.Format, c.Version = EvidenceFormat, e.MinVersion()
	return json.MarshalIndent(&c, "", "  ")
}

func malformed(format string, args ...any) *RefusalError {
	return refuse(RuleEvidenceFormat, format, args...)
}

// DecodeEvidence decodes and validates evidence. Truncated or garbage input,
// unknown fields and oversize input are refused with ErrMalformedEvidence; an
// unknown version also matches ErrUnknownVersion.
func DecodeEvidence(data []byte) (*Evidence, error) {
	if len(data) > MaxEvidenceSize {
		return nil, malformed("%d bytes exceeds the %d-byte limit", len(data), MaxEvidenceSize)
	}
	var hdr struct {
		Format  string `json:"format"`
		Version int    `json:"version"`
		HostID  string `json:"host_id"`
	}
	if err := json.Unmarshal(data, &hdr); err != nil {
		return nil, malformed("not a JSON evidence document: %v", err)
	}
	if hdr.Format != EvidenceFormat {
		return nil, malformed("format %q, want %q", hdr.Format, EvidenceFormat)
	}
	if hdr.Version < EvidenceVersion || hdr.Version > MaxEvidenceVersion {
		re := malformed("evidence version %d, this verifier understands versions %d..%d", hdr.Version, EvidenceVersion, MaxEvidenceVersion)
		re.Cause = ErrUnknownVersion
		return nil, withHost(re, printableHost(hdr.HostID))
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var ev Evidence
	if err := dec.Decode(&ev); err != nil {
		return nil, withHost(malformed("%v", err), printableHost(hdr.HostID))
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, withHost(malformed("trailing data after the evidence"), printableHost(hdr.HostID))
	}
	if err := ev.Validate(); err != nil {
		return nil, err
	}
	return &ev, nil
}

func printableHost(h string) string {
	if validHostID(h) {
		return h
	}
	return ""
}

func validHostID(h string) bool {
	if h == "" || len(h) > maxHostIDLen {
		return false
	}
	for _, r := range h {
		if !unicode.IsPrint(r) || unicode.IsSpace(r) {
			return false
		}
	}
	return true
}

// Validate checks the shape of the evidence (not its cryptography).
func (e *Evidence) Validate() error {
	if !validHostID(e.HostID) {
		return malformed("host_id missing or not printable")
	}
	fail := func(format string, args ...any) error { return withHost(malformed(format, args...), e.HostID) }
	if e.Format != EvidenceFormat || e.Version < EvidenceVersion || e.Version > MaxEvidenceVersion {
		return fail("format %q version %d", e.Format, e.Version)
	}
	if e.Version < e.MinVersion() {
		return fail("ak_cert and ak_intermediates need evidence version %d, the evidence says %d", EvidenceVersionAKCert, e.Version)
	}
	if len(e.Nonce) < MinNonceSize || len(e.Nonce) > MaxNonceSize {
		return fail("nonce of %d bytes, want %d..%d", len(e.Nonce), MinNonceSize, MaxNonceSize)
	}
	for name, b := range map[string][]byte{"ek_public": e.EKPublic, "ak_public": e.AKPublic, "mk_public": e.MKPublic,
		"mk_certify_info": e.MKCertifyInfo, "mk_certify_signature": e.MKCertifySig} {
		if len(b) == 0 || len(b) > maxTPMStructSize {
			return fail("%s missing or larger than %d bytes", name, maxTPMStructSize)
		}
	}
	if len(e.EKCert) > maxCertSize || len(e.EKIntermediates) > maxChainDepth {
		return fail("EK certificate chain too large")
	}
	if len(e.AKCert) > maxCertSize || len(e.AKIntermediates) > maxChainDepth || (len(e.AKCert) == 0 && len(e.AKIntermediates) > 0) {
		return fail("AK certificate chain too large, or intermediates without an AK certificate")
	}
	for _, c := range append(append([][]byte{}, e.EKIntermediates...), e.AKIntermediates...) {
		if len(c) == 0 || len(c) > maxCertSize {
			return fail("empty or oversize intermediate certificate")
		}
	}
	if len(e.Quotes) == 0 || len(e.Quotes) > maxQuotes {
		return fail("%d quotes, want 1..%d", len(e.Quotes), maxQuotes)
	}
	for i, q := range e.Quotes {
		if len(q.Attest) == 0 || len(q.Attest) > maxTPMStructSize || len(q.Signature) == 0 || len(q.Signature) > maxTPMStructSize {
			return fail("quote %d: attest or signature missing or too large", i)
		}
	}
	if len(e.PCRs) == 0 {
		return fail("no PCR values")
	}
	for bank, m := range e.PCRs {
		h, ok := bank.Hash()
		if !ok {
			return fail("unknown PCR bank %q", bank)
		}
		for k, v := range m {
			i, err := strconv.Atoi(k)
			if err != nil || i < 0 || i > 23 || strconv.Itoa(i) != k {
				return fail("PCR index %q out of range 0..23", k)
			}
			if len(v) != h.Size() {
				return fail("%s PCR %d: %d bytes, want %d", bank, i, len(v), h.Size())
			}
		}
	}
	if len(e.EventLog) > maxEventLogSize {
		return fail("event log larger than %d bytes", maxEventLogSize)
	}
	if e.ProducedAt.IsZero() {
		return fail("produced_at missing")
	}
	return nil
}
