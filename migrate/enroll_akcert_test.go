package migrate_test

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
	"math/big"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/attest"
	"github.com/vtpmm/vtpmm/migrate"
)

// TestEnrollByAKCertificate: a host whose AK has a certificate (an IAK-shaped
// one from an enterprise CA) is enrolled on it when the policy allows it,
// without a credential activation (no Activate call reaches it); under an
// activation-only policy the same host is enrolled by activation.
func TestEnrollByAKCertificate(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFleet(t)
	a, b := f.addHost("host-a", goodLog), f.addHost("host-b", goodLog)
	caKey, caCert, caDER := newTestAKCA(t)
	b.ident.AKCert = issueAKCert(t, caKey, caCert, akPublicKey(t, b.ident.AK.Public), b.ident.EK.Public)
	b.restart() // its node presents the certificate

	pc, err := attest.ParseCertificate(caDER)
	if err != nil {
		t.Fatal(err)
	}
	pol := *f.policy
	pol.Enrollment = attest.EnrollEither
	enroller := migrate.NewNode(migrate.Config{
		Host: "host-a", Dial: f.dial("host-a"), Now: time.Now, Audit: a.audit,
		Verifier: &attest.Verifier{Roots: f.roots, AKRoots: attest.NewRootStore(pc), Policy: &pol, Enrollments: f.enr, Clock: time.Now},
	})
	store := &attest.MemoryEnrollments{}
	res, err := enroller.Enroll(ctx, "host-b", store)
	if err != nil {
		t.Fatal(err)
	}
	if res.Record.Method != attest.MethodAKCertificate || len(res.Record.AKCertDigest) != 32 {
		t.Fatalf("record %+v, want method ak-certificate with the certificate's digest", res.Record)
	}
	for _, m := range b.wire.methods() {
		if m == "Activate" {
			t.Fatal("host-b was asked for a credential activation")
		}
	}
	if rec, err := store.Find(ctx, res.EKDigest, res.AKName); err != nil || rec == nil {
		t.Fatalf("enrolment not recorded: %v", err)
	}
	// Activation only: the certificate is not used.
	res, err = a.node.Enroll(ctx, "host-b", &attest.MemoryEnrollments{})
	if err != nil || res.Record.Method != attest.MethodActivation {
		t.Fatalf("enrolment under an activation-only policy: %+v %v", res, err)
	}
}

func newTestAKCA(t *testing.T) (*ecdsa.PrivateKey, *x509.Certificate, []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "Test AK CA"}, IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign, NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return key, cert, der
}

// issueAKCert makes an IAK-shaped certificate (TCG "TPM 2.0 Keys for
// Device Identity and Attestation": digitalSignature, tcg-kp-AIKCertificate,
// a subjectAltName naming the EK by a TCG EK permanent identifier), as
// vtpm/identity's tests do.
func issueAKCert(t *testing.T, caKey *ecdsa.PrivateKey, ca *x509.Certificate, ak crypto.PublicKey, ekPub []byte) []byte {
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
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(now.UnixNano()), NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, UnknownExtKeyUsage: []asn1.ObjectIdentifier{{2, 23, 133, 8, 3}}, BasicConstraintsValid: true,
		ExtraExtensions: []pkix.Extension{{Id: asn1.ObjectIdentifier{2, 5, 29, 17}, Critical: true, Value: san}},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, ak, caKey)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func akPublicKey(t *testing.T, pub []byte) crypto.PublicKey {
	t.Helper()
	p, err := attest.ParsePublic("AK", pub)
	if err != nil {
		t.Fatal(err)
	}
	k, err := p.CryptoKey()
	if err != nil {
		t.Fatal(err)
	}
	return k
}
