package attest

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
)

var update = flag.Bool("update", false, "rewrite internal/fixtures/synthetic (fixtures used by the CLI tests and docs)")

func TestEvidenceRoundTrip(t *testing.T) {
	h := newFakeHost(t)
	nonce := testNonce(1)
	data, err := h.evidence(t, nonce).Encode()
	if err != nil {
		t.Fatal(err)
	}
	ev, err := DecodeEvidence(data)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.verifier(t).Verify(context.Background(), ev, nonce); err != nil {
		t.Fatalf("decoded evidence refused: %v", err)
	}
}

func TestDecodeEvidenceRefusals(t *testing.T) {
	h := newFakeHost(t)
	good, err := h.evidence(t, testNonce(1)).Encode()
	if err != nil {
		t.Fatal(err)
	}
	edit := func(f func(m map[string]any)) []byte {
		var m map[string]any
		if err := json.Unmarshal(good, &m); err != nil {
			t.Fatal(err)
		}
		f(m)
		b, _ := json.Marshal(m)
		return b
	}
	tests := []struct {
		name    string
		data    []byte
		wantErr error
	}{
		{"empty", nil, ErrMalformedEvidence},
		{"garbage", []byte("\x00\x01garbage\xff"), ErrMalformedEvidence},
		{"truncated", good[:len(good)/2], ErrMalformedEvidence},
		{"trailing data", append(append([]byte(nil), good...), []byte(`{"x":1}`)...), ErrMalformedEvidence},
		{"oversize", make([]byte, MaxEvidenceSize+1), ErrMalformedEvidence},
		{"wrong format", edit(func(m map[string]any) { m["format"] = "other" }), ErrMalformedEvidence},
		{"unknown version", edit(func(m map[string]any) { m["version"] = 3 }), ErrUnknownVersion},
		{"ak_cert in version 1", edit(func(m map[string]any) { m["ak_cert"] = "MAA=" }), ErrMalformedEvidence},
		{"unknown field", edit(func(m map[string]any) { m["extra"] = true }), ErrMalformedEvidence},
		{"short nonce", edit(func(m map[string]any) { m["nonce"] = "AAAA" }), ErrMalformedEvidence},
		{"no quotes", edit(func(m map[string]any) { m["quotes"] = []any{} }), ErrMalformedEvidence},
		{"bad PCR index", edit(func(m map[string]any) {
			m["pcrs"] = map[string]any{"sha256": map[string]any{"24": strings.Repeat("00", 32)}}
		}), ErrMalformedEvidence},
		{"bad PCR size", edit(func(m map[string]any) { m["pcrs"] = map[string]any{"sha256": map[string]any{"1": "00"}} }), ErrMalformedEvidence},
		{"unknown bank", edit(func(m map[string]any) { m["pcrs"] = map[string]any{"md5": map[string]any{"1": "00"}} }), ErrMalformedEvidence},
		{"host with spaces", edit(func(m map[string]any) { m["host_id"] = "host b" }), ErrMalformedEvidence},
		{"no produced_at", edit(func(m map[string]any) { delete(m, "produced_at") }), ErrMalformedEvidence},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := DecodeEvidence(tt.data)
			if !errors.Is(err, tt.wantErr) || !errors.Is(err, ErrMalformedEvidence) {
				t.Fatalf("err = %v, want %v", err, tt.wantErr)
			}
		})
	}
}

func TestActivationChallenge(t *testing.T) {
	h := newFakeHost(t)
	akPub := h.evidence(t, testNonce(1)).AKPublic
	ch, err := NewActivationChallenge(rand.Reader, h.ekPub, akPub)
	if err != nil {
		t.Fatal(err)
	}
	if len(ch.CredentialBlob) == 0 || len(ch.EncryptedSecret) != 256 {
		t.Fatalf("challenge blob %d bytes, secret %d bytes (want RSA-2048 OAEP 256)", len(ch.CredentialBlob), len(ch.EncryptedSecret))
	}
	wire, _ := json.Marshal(ch)
	if bytes.Contains(wire, ch.secret) || strings.Contains(string(wire), "secret\":\"") && strings.Contains(string(wire), hex.EncodeToString(ch.secret)) {
		t.Fatal("the secret leaks into the wire form")
	}
	if err := VerifyActivation(ch, ch.secret); err != nil {
		t.Fatalf("right answer refused: %v", err)
	}
	wrong := append([]byte(nil), ch.secret...)
	wrong[0] ^= 1
	for _, ans := range [][]byte{wrong, nil, ch.secret[:16]} {
		if err := VerifyActivation(ch, ans); !errors.Is(err, ErrAKNotActivated) {
			t.Fatalf("wrong answer: err = %v", err)
		}
	}
	// ECC P-256 EK (the SRK-shaped MK stands in: same restricted-decrypt shape).
	if _, err := NewActivationChallenge(rand.Reader, h.evidence(t, testNonce(1)).MKPublic, akPub); err != nil {
		t.Fatalf("ECC EK: %v", err)
	}
	// A non-restricted AK is never activated.
	bad := h.akPub
	bad.ObjectAttributes.Restricted = false
	if _, err := NewActivationChallenge(rand.Reader, h.ekPub, tpm2.Marshal(bad)); !errors.Is(err, ErrAKAttributes) {
		t.Fatalf("unrestricted AK: err = %v", err)
	}
	// Enrolment after activation makes the verifier accept the AK.
	m := &MemoryEnrollments{}
	if err := m.Add(context.Background(), ch.Enrollment("host-b", testNow)); err != nil {
		t.Fatal(err)
	}
	ek, _ := ParsePublic("EK", h.ekPub)
	ak, _ := ParsePublic("AK", akPub)
	akName, _ := ak.Name()
	if ok, _ := m.Activated(context.Background(), ek.Digest(), akName); !ok {
		t.Fatal("enrolment not found")
	}
}

func TestFileEnrollments(t *testing.T) {
	path := filepath.Join(t.TempDir(), "enrollments.json")
	f := &FileEnrollments{Path: path}
	ctx := context.Background()
	if ok, err := f.Activated(ctx, []byte{1}, []byte{2}); ok || err != nil {
		t.Fatalf("empty store: %v %v", ok, err)
	}
	for i := byte(0); i < 3; i++ {
		if err := f.Add(ctx, Enrollment{Host: "h", EKDigest: []byte{i}, AKName: []byte{i, i}, EnrolledAt: testNow}); err != nil {
			t.Fatal(err)
		}
	}
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v, want 0600", st.Mode().Perm())
	}
	again := &FileEnrollments{Path: path}
	if ok, _ := again.Activated(ctx, []byte{2}, []byte{2, 2}); !ok {
		t.Fatal("enrolment 2 not persisted")
	}
	if ok, _ := again.Activated(ctx, []byte{2}, []byte{1, 1}); ok {
		t.Fatal("AK of EK 1 accepted for EK 2")
	}
	entries, _ := os.ReadDir(filepath.Dir(path))
	if len(entries) != 1 {
		t.Fatalf("temporary files left behind: %v", entries)
	}
}

func TestPolicyParse(t *testing.T) {
	good := `version: 1
quote: {bank: sha256, pcrs: [0, 4, 7]}
golden_pcrs:
  sha256:
    "7": ["` + strings.Repeat("ab", 32) + `", "` + strings.Repeat("cd", 32) + `"]
    "0": ` + strings.Repeat("00", 32) + `
event_log: {required: true, require_secure_boot: true}
ek: {allow_sha1: false, check_validity: false}
migration_key: {auth_policy: ""}
max_evidence_age: 5m
`
	p, err := ParsePolicy([]byte(good))
	if err != nil {
		t.Fatal(err)
	}
	if len(p.GoldenPCRs["sha256"]["7"]) != 2 || p.MaxEvidenceAge != 5*time.Minute {
		t.Fatalf("parsed %+v", p)
	}
	// JSON is accepted too.
	js, _ := json.Marshal(map[string]any{"version": 1, "quote": map[string]any{"bank": "sha1", "pcrs": []int{0}}})
	if _, err := ParsePolicy(js); err != nil {
		t.Fatalf("JSON policy: %v", err)
	}
	for name, bad := range map[string]string{
		"unknown key":    "version: 1\nquote: {bank: sha256, pcrs: [0]}\nfoo: 1\n",
		"bad version":    "version: 2\nquote: {bank: sha256, pcrs: [0]}\n",
		"no pcrs":        "version: 1\nquote: {bank: sha256}\n",
		"bad bank":       "version: 1\nquote: {bank: md5, pcrs: [0]}\n",
		"short golden":   "version: 1\nquote: {bank: sha256, pcrs: [0]}\ngolden_pcrs: {sha256: {\"0\": abcd}}\n",
		"pcr range":      "version: 1\nquote: {bank: sha256, pcrs: [24]}\n",
		"bad hex":        "version: 1\nquote: {bank: sha256, pcrs: [0]}\nmigration_key: {auth_policy: xyz}\n",
		"negative age":   "version: 1\nquote: {bank: sha256, pcrs: [0]}\nmax_evidence_age: -1s\n",
		"golden pcr key": "version: 1\nquote: {bank: sha256, pcrs: [0]}\ngolden_pcrs: {sha256: {\"x\": " + strings.Repeat("00", 32) + "}}\n",
	} {
		if _, err := ParsePolicy([]byte(bad)); !errors.Is(err, ErrInvalidPolicy) {
			t.Errorf("%s: err = %v, want ErrInvalidPolicy", name, err)
		}
	}
}

func TestGoldenFromEventLogRoundTrip(t *testing.T) {
	h := newFakeHost(t)
	p := h.policy(t)
	out, err := p.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	back, err := ParsePolicy(out)
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if !back.EventLog.RequireSecureBoot || len(back.EventLog.AllowedBootComponents) != 3 || len(back.GoldenPCRs["sha256"]) != 10 {
		t.Fatalf("golden policy lost information:\n%s", out)
	}
}

// TestWriteFixtures rewrites the shared fixtures' synthetic set
// (internal/fixtures/synthetic) with -update: a complete,
// verifiable evidence file and what verifies it (used by cmd/vtpmctl tests
// and the example in docs/attestation.md).
func TestWriteFixtures(t *testing.T) {
	if !*update {
		t.Skip("run with -update to rewrite internal/fixtures/synthetic")
	}
	dir := filepath.Join("..", "internal", "fixtures", "synthetic")
	if err := os.MkdirAll(filepath.Join(dir, "roots"), 0o755); err != nil {
		t.Fatal(err)
	}
	h := newFakeHost(t)
	nonce := testNonce(1)
	ev, _ := h.evidence(t, nonce).Encode()
	pol, _ := h.policy(t).Marshal()
	ekDigest, akName := h.enrolled(t).list[0].EKDigest, h.enrolled(t).list[0].AKName
	enr, _ := json.MarshalIndent([]Enrollment{{Host: "host-b", EKDigest: ekDigest, AKName: akName, EnrolledAt: testNow}}, "", "  ")
	files := map[string][]byte{
		"evidence.json":    ev,
		"policy.yaml":      pol,
		"enrollments.json": enr,
		"nonce.hex":        []byte(hex.EncodeToString(nonce) + "\n"),
		"roots/ca.pem":     pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: h.caDER}),
		"ekcert.der":       h.ekCert,
	}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// TestActivationECCP384EK: swtpm_setup creates an ECC P-384 EK next to the
// RSA-2048 one; both must be usable for activation.
func TestActivationECCP384EK(t *testing.T) {
	h := newFakeHost(t)
	k, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := k.PublicKey.ECDH()
	raw := b.Bytes()
	ek := tpm2.TPMTPublic{
		Type: tpm2.TPMAlgECC, NameAlg: tpm2.TPMAlgSHA384,
		ObjectAttributes: tpm2.TPMAObject{FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true, AdminWithPolicy: true,
			Restricted: true, Decrypt: true},
		AuthPolicy: tpm2.TPM2BDigest{Buffer: make([]byte, 48)},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgAES, KeyBits: tpm2.NewTPMUSymKeyBits(tpm2.TPMAlgAES, tpm2.TPMKeyBits(256)),
				Mode: tpm2.NewTPMUSymMode(tpm2.TPMAlgAES, tpm2.TPMAlgCFB)},
			CurveID: tpm2.TPMECCNistP384,
			KDF:     tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
		}),
		Unique: tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
			X: tpm2.TPM2BECCParameter{Buffer: raw[1:49]}, Y: tpm2.TPM2BECCParameter{Buffer: raw[49:]}}),
	}
	ch, err := NewActivationChallenge(rand.Reader, tpm2.Marshal(ek), tpm2.Marshal(h.akPub))
	if err != nil {
		t.Fatal(err)
	}
	if len(ch.EncryptedSecret) != 2+48+2+48 { // TPMS_ECC_POINT of the ephemeral key
		t.Fatalf("encrypted secret %d bytes", len(ch.EncryptedSecret))
	}
	if err := VerifyActivation(ch, ch.secret); err != nil {
		t.Fatal(err)
	}
}
