package attest

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
)

// testCA is a certificate authority for AK certificate tests.
type testCA struct {
	key  *ecdsa.PrivateKey
	cert *x509.Certificate
	der  []byte
}

func newTestCA(t testing.TB, name string, parent *testCA) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: name, Organization: []string{"vtpmm test"}},
		NotBefore: testNow.Add(-24 * time.Hour), NotAfter: testNow.Add(365 * 24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign,
	}
	issuer, signer := tmpl, key
	if parent != nil {
		issuer, signer = parent.cert, parent.key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, issuer, &key.PublicKey, signer)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testCA{key: key, cert: cert, der: der}
}

func (c *testCA) store(t testing.TB) *RootStore {
	t.Helper()
	pc, err := ParseCertificate(c.der)
	if err != nil {
		t.Fatal(err)
	}
	return NewRootStore(pc)
}

// iakOpts shapes an IAK-like certificate (TCG "TPM 2.0 Keys for Device
// Identity and Attestation"): digitalSignature, tcg-kp-AIKCertificate, a
// subjectAltName naming the EK (TCG EK permanent identifier), the TPM and
// the device.
type iakOpts struct {
	key       crypto.PublicKey
	keyUsage  x509.KeyUsage
	ekus      []asn1.ObjectIdentifier
	isCA      bool
	permID    string // hex; "" for none
	tpm       [3]string
	notAfter  time.Time
	noSAN     bool
	sha1      bool
	issuerKey crypto.Signer
}

func (c *testCA) issueAK(t testing.TB, o iakOpts) []byte {
	t.Helper()
	if o.keyUsage == 0 {
		o.keyUsage = x509.KeyUsageDigitalSignature
	}
	if o.ekus == nil {
		o.ekus = []asn1.ObjectIdentifier{oidTCGKPAIKCertificate}
	}
	if o.notAfter.IsZero() {
		o.notAfter = testNow.Add(30 * 24 * time.Hour)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), NotBefore: testNow.Add(-time.Hour), NotAfter: o.notAfter,
		KeyUsage: o.keyUsage, UnknownExtKeyUsage: o.ekus, BasicConstraintsValid: true, IsCA: o.isCA,
	}
	if !o.noSAN {
		tmpl.ExtraExtensions = []pkix.Extension{sanExtension(t, o.permID, o.tpm)}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.cert, o.key, c.key)
	if err != nil {
		t.Fatal(err)
	}
	if o.sha1 {
		der = resignSHA1(t, der, c.key)
	}
	return der
}

// sanExtension builds a critical subjectAltName with an EK permanent
// identifier (otherName), a hardwareModuleName and a TPM directoryName.
func sanExtension(t testing.TB, permID string, tpm [3]string) pkix.Extension {
	t.Helper()
	otherName := func(typ asn1.ObjectIdentifier, value any) asn1.RawValue {
		v, err := asn1.Marshal(value)
		if err != nil {
			t.Fatal(err)
		}
		o, _ := asn1.Marshal(typ)
		ex, _ := asn1.Marshal(asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 0, IsCompound: true, Bytes: v})
		return asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 0, IsCompound: true, Bytes: append(o, ex...)}
	}
	var names []asn1.RawValue
	if permID != "" {
		names = append(names, otherName(oidPermanentIdentifier, struct {
			Value    string `asn1:"utf8"`
			Assigner asn1.ObjectIdentifier
		}{permID, oidTCGEKPermIDSHA256}))
	}
	names = append(names, otherName(oidHardwareModuleName, hwModule{Type: asn1.ObjectIdentifier{2, 23, 133, 1, 2}, Serial: []byte("host-b-serial")}))
	if tpm[0] != "" {
		rdn := pkix.RDNSequence{
			{{Type: oidTCGTPMManufacturer, Value: tpm[0]}}, {{Type: oidTCGTPMModel, Value: tpm[1]}}, {{Type: oidTCGTPMVersion, Value: tpm[2]}},
		}
		dn, err := asn1.Marshal(rdn)
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 4, IsCompound: true, Bytes: dn})
	}
	v, err := asn1.Marshal(names)
	if err != nil {
		t.Fatal(err)
	}
	return pkix.Extension{Id: oidExtSAN, Critical: true, Value: v}
}

// akCertFixture is a fake host with an AK CA (root + intermediate) and an
// IAK-shaped certificate over its AK that names its EK.
type akCertFixture struct {
	h      *fakeHost
	root   *testCA
	inter  *testCA
	akCert []byte
}

func newAKCertFixture(t testing.TB) *akCertFixture {
	t.Helper()
	f := &akCertFixture{h: newFakeHost(t)}
	f.root = newTestCA(t, "Test IAK Root CA", nil)
	f.inter = newTestCA(t, "Test IAK Issuing CA", f.root)
	f.akCert = f.inter.issueAK(t, iakOpts{key: &f.h.akKey.PublicKey, permID: ekPermID(f.h.ekPub)})
	return f
}

func ekPermID(ekPub []byte) string {
	d := sha256.Sum256(ekPub)
	return strings.ToUpper(hex.EncodeToString(d[:]))
}

func (f *akCertFixture) verifier(t testing.TB, mode EnrollmentMode) *Verifier {
	v := f.h.verifier(t)
	v.Enrollments = &MemoryEnrollments{}
	v.AKRoots = f.root.store(t)
	v.Policy.Enrollment = mode
	return v
}

func (f *akCertFixture) request(cert []byte) AKCertEnrollment {
	return AKCertEnrollment{
		Host: "host-b", EKPublic: f.h.ekPub, EKCert: f.h.ekCert, AKPublic: tpm2.Marshal(f.h.akPub),
		AKCert: cert, AKIntermediates: [][]byte{f.inter.der},
	}
}

func (f *akCertFixture) evidence(t testing.TB, nonce []byte) *Evidence {
	ev := f.h.evidence(t, nonce)
	ev.AKCert, ev.AKIntermediates = f.akCert, [][]byte{f.inter.der}
	raw, err := ev.Encode()
	if err != nil {
		t.Fatal(err)
	}
	out, err := DecodeEvidence(raw)
	if err != nil {
		t.Fatal(err)
	}
	if out.Version != EvidenceVersionAKCert {
		t.Fatalf("evidence with an AK certificate encoded as version %d", out.Version)
	}
	return out
}

// TestEnrollByAKCertificate: a host is enrolled on its AK certificate (no
// activation), then its evidence, which carries the certificate, verifies.
func TestEnrollByAKCertificate(t *testing.T) {
	f := newAKCertFixture(t)
	for _, mode := range []EnrollmentMode{EnrollAKCertificate, EnrollEither} {
		t.Run(string(mode), func(t *testing.T) {
			v := f.verifier(t, mode)
			res, err := v.EnrollByAKCertificate(context.Background(), f.request(f.akCert))
			if err != nil {
				t.Fatalf("%v\n%s", err, res.Explain())
			}
			if res.Enrollment == nil || res.Enrollment.Method != MethodAKCertificate || len(res.AKChain) != 3 {
				t.Fatalf("enrolment %+v, AK chain %d links", res.Enrollment, len(res.AKChain))
			}
			t.Log("\n" + res.Explain())
			nonce := testNonce(3)
			res, err = v.Verify(context.Background(), f.evidence(t, nonce), nonce)
			if err != nil {
				t.Fatalf("%v\n%s", err, res.Explain())
			}
			for _, want := range []string{"PASS ak-activation", "by ak-certificate", "PASS ak-cert-chain", "PASS ak-cert-binding", "names EK"} {
				if !strings.Contains(res.Explain(), want) {
					t.Fatalf("explain lacks %q:\n%s", want, res.Explain())
				}
			}
			// Evidence of the same host without its AK certificate.
			ev := f.h.evidence(t, nonce)
			_, err = v.Verify(context.Background(), ev, nonce)
			wantRefusal(t, err, RuleAKCertChain)
		})
	}
}

func wantRefusal(t testing.TB, err error, rule Rule) {
	t.Helper()
	var re *RefusalError
	if !errors.As(err, &re) || re.Rule != rule || !errors.Is(err, ruleSentinel(rule)) {
		t.Fatalf("err = %v, want a refusal by rule %s", err, rule)
	}
}

// TestEnrollByAKCertificateRefusals has one case per AK certificate rule.
func TestEnrollByAKCertificateRefusals(t *testing.T) {
	f := newAKCertFixture(t)
	otherKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	otherEK, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	otherRoot := newTestCA(t, "Another CA", nil)
	ak := &f.h.akKey.PublicKey
	perm := ekPermID(f.h.ekPub)
	tests := []struct {
		name   string
		mutate func(t *testing.T, req *AKCertEnrollment, v *Verifier)
		rule   Rule
	}{
		{"policy enrolls by activation only", func(t *testing.T, req *AKCertEnrollment, v *Verifier) {
			v.Policy.Enrollment = EnrollActivation
		}, RuleEnrollmentMethod},
		{"wrong key", func(t *testing.T, req *AKCertEnrollment, v *Verifier) {
			req.AKCert = f.inter.issueAK(t, iakOpts{key: &otherKey.PublicKey, permID: perm})
		}, RuleAKCertKey},
		{"EK certificate presented as the AK certificate", func(t *testing.T, req *AKCertEnrollment, v *Verifier) {
			v.AKRoots = f.h.verifier(t).Roots
			req.AKCert, req.AKIntermediates = f.h.ekCert, nil
		}, RuleAKCertKey},
		{"wrong root", func(t *testing.T, req *AKCertEnrollment, v *Verifier) {
			v.AKRoots = otherRoot.store(t)
		}, RuleAKCertChain},
		{"certificate of another CA", func(t *testing.T, req *AKCertEnrollment, v *Verifier) {
			req.AKCert = otherRoot.issueAK(t, iakOpts{key: ak, permID: perm})
		}, RuleAKCertChain},
		{"wrong usage: keyEncipherment", func(t *testing.T, req *AKCertEnrollment, v *Verifier) {
			req.AKCert = f.inter.issueAK(t, iakOpts{key: ak, permID: perm, keyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment})
		}, RuleAKCertUsage},
		{"wrong usage: no digitalSignature", func(t *testing.T, req *AKCertEnrollment, v *Verifier) {
			req.AKCert = f.inter.issueAK(t, iakOpts{key: ak, permID: perm, keyUsage: x509.KeyUsageContentCommitment})
		}, RuleAKCertUsage},
		{"wrong usage: TLS server EKU", func(t *testing.T, req *AKCertEnrollment, v *Verifier) {
			req.AKCert = f.inter.issueAK(t, iakOpts{key: ak, permID: perm, ekus: []asn1.ObjectIdentifier{{1, 3, 6, 1, 5, 5, 7, 3, 1}}})
		}, RuleAKCertUsage},
		{"wrong usage: a CA certificate", func(t *testing.T, req *AKCertEnrollment, v *Verifier) {
			req.AKCert = f.inter.issueAK(t, iakOpts{key: ak, permID: perm, isCA: true, keyUsage: x509.KeyUsageDigitalSignature})
		}, RuleAKCertUsage},
		{"SHA-1 signature (accepted on EK paths only)", func(t *testing.T, req *AKCertEnrollment, v *Verifier) {
			req.AKCert = f.inter.issueAK(t, iakOpts{key: ak, permID: perm, sha1: true})
		}, RuleAKCertSignature},
		{"tampered certificate", func(t *testing.T, req *AKCertEnrollment, v *Verifier) {
			c := append([]byte(nil), f.akCert...)
			c[len(c)-3] ^= 1
			req.AKCert = c
		}, RuleAKCertSignature},
		{"expired", func(t *testing.T, req *AKCertEnrollment, v *Verifier) {
			req.AKCert = f.inter.issueAK(t, iakOpts{key: ak, permID: perm, notAfter: testNow.Add(-time.Minute)})
		}, RuleAKCertValidity},
		{"names another EK", func(t *testing.T, req *AKCertEnrollment, v *Verifier) {
			raw, _ := x509.MarshalPKIXPublicKey(&otherEK.PublicKey)
			req.AKCert = f.inter.issueAK(t, iakOpts{key: ak, permID: ekPermID(raw)})
		}, RuleAKCertBinding},
		{"names no EK under require_ek_binding", func(t *testing.T, req *AKCertEnrollment, v *Verifier) {
			v.Policy.AKCert.RequireEKBinding = true
			req.AKCert = f.inter.issueAK(t, iakOpts{key: ak})
		}, RuleAKCertBinding},
		{"AK is not a restricted key", func(t *testing.T, req *AKCertEnrollment, v *Verifier) {
			p := f.h.akPub
			p.ObjectAttributes.Restricted = false
			req.AKPublic = tpm2.Marshal(p)
		}, RuleAKAttributes},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v := f.verifier(t, EnrollAKCertificate)
			req := f.request(f.akCert)
			tt.mutate(t, &req, v)
			res, err := v.EnrollByAKCertificate(context.Background(), req)
			wantRefusal(t, err, tt.rule)
			if last := res.Steps[len(res.Steps)-1]; last.Outcome != OutcomeFail || last.Rule != tt.rule {
				t.Fatalf("last step %+v", last)
			}
			if n := len(v.Enrollments.(*MemoryEnrollments).list); n != 0 {
				t.Fatalf("refused host was enrolled (%d records)", n)
			}
			t.Logf("refusal: %v", err)
		})
	}
}

// TestAKCertWithoutEKNameWarns: a certificate that does not name the EK
// is accepted by default, with a warning that says what it does not prove.
func TestAKCertWithoutEKNameWarns(t *testing.T) {
	f := newAKCertFixture(t)
	v := f.verifier(t, EnrollAKCertificate)
	res, err := v.EnrollByAKCertificate(context.Background(), f.request(f.inter.issueAK(t, iakOpts{key: &f.h.akKey.PublicKey, noSAN: true})))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(res.Explain(), "WARN ak-cert-binding") {
		t.Fatalf("no warning:\n%s", res.Explain())
	}
}

// TestVerifyEnrollmentModes: the policy's enrollment decides which records
// are accepted.
func TestVerifyEnrollmentModes(t *testing.T) {
	f := newAKCertFixture(t)
	nonce := testNonce(5)
	activated := f.h.enrolled(t) // an activation record (Method "")
	byCert := &MemoryEnrollments{}
	v := f.verifier(t, EnrollAKCertificate)
	v.Enrollments = byCert
	if _, err := v.EnrollByAKCertificate(context.Background(), f.request(f.akCert)); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		mode EnrollmentMode
		enr  Enrollments
		want Rule // "" accepted
	}{
		{"activation record, activation policy", EnrollActivation, activated, ""},
		{"activation record, default policy", "", activated, ""},
		{"activation record, ak-certificate policy", EnrollAKCertificate, activated, RuleEnrollmentMethod},
		{"activation record, either", EnrollEither, activated, ""},
		{"certificate record, activation policy", EnrollActivation, byCert, RuleEnrollmentMethod},
		{"certificate record, either", EnrollEither, byCert, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v := f.verifier(t, tt.mode)
			v.Enrollments = tt.enr
			res, err := v.Verify(context.Background(), f.evidence(t, nonce), nonce)
			if tt.want == "" {
				if err != nil {
					t.Fatalf("%v\n%s", err, res.Explain())
				}
				return
			}
			wantRefusal(t, err, tt.want)
		})
	}
}

// TestWriteAKCertFixtures writes internal/fixtures/synthetic/akcert/: evidence
// version 2 carrying an IAK-shaped certificate, the host's enrolment on it,
// the EK and AK roots and a policy with enrollment: ak-certificate (used by
// the vtpmctl tests and docs/attestation.md). Software keys only.
func TestWriteAKCertFixtures(t *testing.T) {
	if !*update {
		t.Skip("run with -update to rewrite internal/fixtures/synthetic/akcert")
	}
	dir := filepath.Join("..", "internal", "fixtures", "synthetic", "akcert")
	for _, d := range []string{"roots", "akroots"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	f := newAKCertFixture(t)
	v := f.verifier(t, EnrollAKCertificate)
	res, err := v.EnrollByAKCertificate(context.Background(), f.request(f.akCert))
	if err != nil {
		t.Fatal(err)
	}
	nonce := testNonce(1)
	ev, _ := f.evidence(t, nonce).Encode()
	v.Policy.Enrollment = EnrollAKCertificate
	pol, _ := v.Policy.Marshal()
	enr, _ := json.MarshalIndent([]Enrollment{*res.Enrollment}, "", "  ")
	files := map[string][]byte{
		"evidence.json":    ev,
		"policy.yaml":      pol,
		"enrollments.json": enr,
		"nonce.hex":        []byte(hex.EncodeToString(nonce) + "\n"),
		"roots/ca.pem":     pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: f.h.caDER}),
		"akroots/root.pem": pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: f.root.der}),
	}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
