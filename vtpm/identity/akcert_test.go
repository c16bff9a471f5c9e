package identity_test

import (
	"bytes"
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
	"encoding/pem"
	"errors"
	"math/big"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/vtpmm/vtpmm/attest"
	"github.com/vtpmm/vtpmm/vtpm/identity"
)

// akCA is a test CA that issues IAK-shaped AK certificates.
type akCA struct {
	key  *ecdsa.PrivateKey
	cert *x509.Certificate
	der  []byte
}

func newAKCA(t *testing.T, name string) *akCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name}, IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign, NotBefore: testNow.Add(-time.Hour), NotAfter: testNow.Add(24 * time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &akCA{key: key, cert: cert, der: der}
}

func (c *akCA) store(t *testing.T) *attest.RootStore {
	t.Helper()
	pc, err := attest.ParseCertificate(c.der)
	if err != nil {
		t.Fatal(err)
	}
	return attest.NewRootStore(pc)
}

// issue makes an IAK-shaped certificate (TCG "TPM 2.0 Keys for Device
// Identity and Attestation": digitalSignature, tcg-kp-AIKCertificate, a
// subjectAltName naming the EK by a TCG EK permanent identifier).
func (c *akCA) issue(t *testing.T, key crypto.PublicKey, ekPub []byte, usage x509.KeyUsage) []byte {
	t.Helper()
	d := sha256.Sum256(ekPub)
	pid, err := asn1.Marshal(struct {
		Value    string `asn1:"utf8"`
		Assigner asn1.ObjectIdentifier
	}{hex.EncodeToString(d[:]), asn1.ObjectIdentifier{2, 23, 133, 12, 1}})
	if err != nil {
		t.Fatal(err)
	}
	typ, _ := asn1.Marshal(asn1.ObjectIdentifier{1, 3, 6, 1, 5, 5, 7, 8, 3})
	val, _ := asn1.Marshal(asn1.RawValue{Class: asn1.ClassContextSpecific, Tag: 0, IsCompound: true, Bytes: pid})
	san, err := asn1.Marshal([]asn1.RawValue{{Class: asn1.ClassContextSpecific, Tag: 0, IsCompound: true, Bytes: append(typ, val...)}})
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), NotBefore: testNow.Add(-time.Hour), NotAfter: testNow.Add(time.Hour),
		KeyUsage: usage, UnknownExtKeyUsage: []asn1.ObjectIdentifier{{2, 23, 133, 8, 3}}, BasicConstraintsValid: true,
		ExtraExtensions: []pkix.Extension{{Id: asn1.ObjectIdentifier{2, 5, 29, 17}, Critical: true, Value: san}},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.cert, key, c.key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func akKey(t *testing.T, id *identity.Identity) crypto.PublicKey {
	t.Helper()
	p, err := attest.ParsePublic("AK", id.AK.Public)
	if err != nil {
		t.Fatal(err)
	}
	k, err := p.CryptoKey()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// TestAKCertificateEnrollment: a real swtpm AK gets an IAK-shaped
// certificate from a test CA, stored in an NV index. The host is enrolled
// on it (no credential activation), its evidence carries it (version 2)
// and verifies; certificates with a wrong key, under a wrong root or with a
// wrong usage are refused by their rules.
func TestAKCertificateEnrollment(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	good := readFile(t, goodLog)
	h := newHost(t, "host-iak")
	h.boot(good)
	id, err := identity.Provision(ctx, h.tpm, identity.ProvisionOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ca := newAKCA(t, "Test IAK CA")
	cert := ca.issue(t, akKey(t, id), id.EK.Public, x509.KeyUsageDigitalSignature)
	const nv = tpm2.TPMHandle(0x01000100)
	if err := identity.StoreAKCertNV(ctx, h.tpm, nv, cert); err != nil {
		t.Fatal(err)
	}
	if err := identity.StoreAKCertNV(ctx, h.tpm, nv, cert); !errors.Is(err, identity.ErrHandleInUse) {
		t.Fatalf("second store: %v, want ErrHandleInUse", err)
	}
	idc, err := identity.LoadIdentity(ctx, h.tpm, identity.LoadOptions{AKCert: identity.AKCertSource{NV: nv}})
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(idc.AKCert, cert) {
		t.Fatal("the AK certificate read from NV differs from the one stored")
	}

	pol := goodPolicy(t)
	pol.Enrollment = attest.EnrollAKCertificate
	enr := &attest.MemoryEnrollments{}
	v := &attest.Verifier{Roots: h.roots(t), AKRoots: ca.store(t), Policy: pol, Enrollments: enr, Clock: fixedClock(testNow)}
	req := attest.AKCertEnrollment{Host: "host-iak", EKPublic: idc.EK.Public, EKCert: idc.EK.Cert, AKPublic: idc.AK.Public, AKCert: idc.AKCert}
	res, err := v.EnrollByAKCertificate(ctx, req)
	if err != nil {
		t.Fatalf("%v\n%s", err, res.Explain())
	}
	t.Logf("enrolment:\n%s", res.Explain())

	nonce := bytes.Repeat([]byte{7}, 32)
	ev := produce(t, h, idc, "host-iak", nonce, good)
	if ev.Version != attest.EvidenceVersionAKCert || !bytes.Equal(ev.AKCert, cert) {
		t.Fatalf("evidence version %d, AK certificate %d bytes", ev.Version, len(ev.AKCert))
	}
	if res, err := v.Verify(ctx, ev, nonce); err != nil {
		t.Fatalf("%v\n%s", err, res.Explain())
	}
	// Without the certificate (an identity loaded without the source) the
	// host, enrolled on its certificate, is refused.
	nonce2 := bytes.Repeat([]byte{8}, 32)
	_, err = v.Verify(ctx, produce(t, h, id, "host-iak", nonce2, good), nonce2)
	wantRule(t, err, attest.RuleAKCertChain, attest.ErrAKCertUntrusted)

	other, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	otherCA := newAKCA(t, "Another CA")
	refusals := []struct {
		name     string
		cert     []byte
		roots    *attest.RootStore
		rule     attest.Rule
		sentinel error
	}{
		{"wrong key", ca.issue(t, &other.PublicKey, id.EK.Public, x509.KeyUsageDigitalSignature), ca.store(t), attest.RuleAKCertKey, attest.ErrAKCertMismatch},
		{"wrong root", cert, otherCA.store(t), attest.RuleAKCertChain, attest.ErrAKCertUntrusted},
		{"wrong usage", ca.issue(t, akKey(t, id), id.EK.Public, x509.KeyUsageDigitalSignature|x509.KeyUsageKeyEncipherment), ca.store(t), attest.RuleAKCertUsage, attest.ErrAKCertUsage},
	}
	for _, tt := range refusals {
		t.Run(tt.name, func(t *testing.T) {
			v := &attest.Verifier{Roots: h.roots(t), AKRoots: tt.roots, Policy: pol, Enrollments: &attest.MemoryEnrollments{}, Clock: fixedClock(testNow)}
			r := req
			r.AKCert = tt.cert
			_, err := v.EnrollByAKCertificate(ctx, r)
			wantRule(t, err, tt.rule, tt.sentinel)
		})
	}
}

// TestReadAKCert: the certificate source is a file (PEM accepted) or an NV
// index; a certificate for another key or a missing source is refused.
func TestReadAKCert(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	h := newHost(t, "host-akfile")
	id, err := identity.Provision(ctx, h.tpm, identity.ProvisionOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ca := newAKCA(t, "Test IAK CA")
	cert := ca.issue(t, akKey(t, id), id.EK.Public, x509.KeyUsageDigitalSignature)
	other, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	dir := t.TempDir()
	write := func(name string, data []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	tests := []struct {
		name string
		src  identity.AKCertSource
		want error
	}{
		{"PEM file", identity.AKCertSource{File: write("ak.pem", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert}))}, nil},
		{"DER file", identity.AKCertSource{File: write("ak.der", cert)}, nil},
		{"certificate of another key", identity.AKCertSource{File: write("other.der", ca.issue(t, &other.PublicKey, id.EK.Public, x509.KeyUsageDigitalSignature))}, identity.ErrAKCertMismatch},
		{"missing file", identity.AKCertSource{File: filepath.Join(dir, "absent.der")}, identity.ErrNoAKCert},
		{"not a certificate", identity.AKCertSource{File: write("garbage", []byte("not a certificate"))}, identity.ErrNoAKCert},
		{"missing NV index", identity.AKCertSource{NV: 0x01000177}, identity.ErrNoAKCert},
		{"both sources", identity.AKCertSource{NV: 0x01000177, File: "x"}, identity.ErrBadOptions},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := identity.ReadAKCert(ctx, h.tpm, tt.src, id.AK.Public)
			if tt.want != nil {
				if !errors.Is(err, tt.want) {
					t.Fatalf("err = %v, want %v", err, tt.want)
				}
				return
			}
			if err != nil || !bytes.Equal(got, cert) {
				t.Fatalf("got %d bytes, err %v", len(got), err)
			}
		})
	}
	if _, err := identity.LoadIdentity(ctx, h.tpm, identity.LoadOptions{AKCert: identity.AKCertSource{File: filepath.Join(dir, "other.der")}}); !errors.Is(err, identity.ErrAKCertMismatch) {
		t.Fatalf("LoadIdentity with a foreign certificate: %v", err)
	}
}
