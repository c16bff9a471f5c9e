package attest

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
)

// fakeHost is a software stand-in for a host TPM: faithful TPM structures
// (tpm2.Marshal-ed TPMT_PUBLIC / TPMS_ATTEST / TPMT_SIGNATURE) signed with
// software keys. The end-to-end suite does the same with swtpm.
type fakeHost struct {
	caKey  *ecdsa.PrivateKey
	caCert *x509.Certificate
	caDER  []byte
	ekKey  *rsa.PrivateKey
	ekPub  []byte
	ekCert []byte
	akKey  *ecdsa.PrivateKey
	akPub  tpm2.TPMTPublic
	mkPub  tpm2.TPMTPublic
	log    []byte
	pcrs   PCRValues
	now    time.Time
}

var testNow = time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC)

func newFakeHost(t testing.TB) *fakeHost {
	t.Helper()
	h := &fakeHost{now: testNow}
	var err error
	if h.caKey, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader); err != nil {
		t.Fatal(err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "Test TPM EK Root CA", Organization: []string{"vtpmm test"}},
		NotBefore: testNow.Add(-time.Hour), NotAfter: testNow.Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign,
	}
	if h.caDER, err = x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &h.caKey.PublicKey, h.caKey); err != nil {
		t.Fatal(err)
	}
	h.caCert, _ = x509.ParseCertificate(h.caDER)
	if h.ekKey, err = rsa.GenerateKey(rand.Reader, 2048); err != nil {
		t.Fatal(err)
	}
	ek := tpm2.RSAEKTemplate
	ek.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: h.ekKey.N.Bytes()})
	h.ekPub = tpm2.Marshal(ek)
	h.ekCert = h.issueEKCert(t, &h.ekKey.PublicKey)
	if h.akKey, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader); err != nil {
		t.Fatal(err)
	}
	h.akPub = akTemplate(&h.akKey.PublicKey)
	mkKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	h.mkPub = tpm2.ECCSRKTemplate
	h.mkPub.Unique = eccUnique(&mkKey.PublicKey)
	// "Boot" the host from a real event log (GCE COS, Secure Boot on).
	h.log = readFile(t, "attestations/extracted/gce-cos-85.eventlog.bin")
	l, err := ParseEventLog(h.log)
	if err != nil {
		t.Fatal(err)
	}
	h.pcrs = PCRValues{"sha256": {}}
	for i, v := range l.Replay()["sha256"] {
		h.pcrs["sha256"][i] = v
	}
	return h
}

func (h *fakeHost) issueEKCert(t testing.TB, pub any) []byte {
	t.Helper()
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(42), NotBefore: testNow.Add(-time.Hour), NotAfter: testNow.Add(24 * time.Hour),
		Subject: pkix.Name{CommonName: "test EK"}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, h.caCert, pub, h.caKey)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func eccUnique(k *ecdsa.PublicKey) tpm2.TPMUPublicID {
	b, _ := k.ECDH()
	raw := b.Bytes() // 0x04 || X || Y
	return tpm2.NewTPMUPublicID(tpm2.TPMAlgECC, &tpm2.TPMSECCPoint{
		X: tpm2.TPM2BECCParameter{Buffer: raw[1:33]}, Y: tpm2.TPM2BECCParameter{Buffer: raw[33:]}})
}

func akTemplate(k *ecdsa.PublicKey) tpm2.TPMTPublic {
	return tpm2.TPMTPublic{
		Type: tpm2.TPMAlgECC, NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true, UserWithAuth: true,
			Restricted: true, SignEncrypt: true},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgECC, &tpm2.TPMSECCParms{
			Symmetric: tpm2.TPMTSymDefObject{Algorithm: tpm2.TPMAlgNull},
			Scheme: tpm2.TPMTECCScheme{Scheme: tpm2.TPMAlgECDSA, Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgECDSA,
				&tpm2.TPMSSigSchemeECDSA{HashAlg: tpm2.TPMAlgSHA256})},
			CurveID: tpm2.TPMECCNistP256,
			KDF:     tpm2.TPMTKDFScheme{Scheme: tpm2.TPMAlgNull},
		}),
		Unique: eccUnique(k),
	}
}

func name(t testing.TB, pub tpm2.TPMTPublic) []byte {
	t.Helper()
	n, err := tpm2.ObjectName(&pub)
	if err != nil {
		t.Fatal(err)
	}
	return n.Buffer
}

// sign returns a TPMT_SIGNATURE (ECDSA-SHA256) by the AK over msg.
func (h *fakeHost) sign(t testing.TB, msg []byte) []byte {
	t.Helper()
	d := sha256.Sum256(msg)
	r, s, err := ecdsa.Sign(rand.Reader, h.akKey, d[:])
	if err != nil {
		t.Fatal(err)
	}
	return tpm2.Marshal(tpm2.TPMTSignature{SigAlg: tpm2.TPMAlgECDSA, Signature: tpm2.NewTPMUSignature(tpm2.TPMAlgECDSA,
		&tpm2.TPMSSignatureECC{Hash: tpm2.TPMAlgSHA256, SignatureR: tpm2.TPM2BECCParameter{Buffer: r.FillBytes(make([]byte, 32))},
			SignatureS: tpm2.TPM2BECCParameter{Buffer: s.FillBytes(make([]byte, 32))}})})
}

func (h *fakeHost) attest(t testing.TB, typ tpm2.TPMST, nonce []byte, info tpm2.TPMUAttest) []byte {
	return tpm2.Marshal(tpm2.TPMSAttest{
		Magic: tpm2.TPMGeneratedValue, Type: typ, QualifiedSigner: tpm2.TPM2BName{Buffer: name(t, h.akPub)},
		ExtraData: tpm2.TPM2BData{Buffer: nonce}, ClockInfo: tpm2.TPMSClockInfo{Clock: 123456, ResetCount: 3, Safe: true},
		FirmwareVersion: 0x20240101, Attested: info,
	})
}

func (h *fakeHost) certify(t testing.TB, nonce []byte, certifiedName []byte) []byte {
	return h.attest(t, tpm2.TPMSTAttestCertify, nonce, tpm2.NewTPMUAttest(tpm2.TPMSTAttestCertify,
		&tpm2.TPMSCertifyInfo{Name: tpm2.TPM2BName{Buffer: certifiedName}, QualifiedName: tpm2.TPM2BName{Buffer: certifiedName}}))
}

func (h *fakeHost) quote(t testing.TB, nonce []byte, bank Bank, pcrs []int, vals PCRValues) []byte {
	sel := make([]byte, 3)
	dig := sha256.New()
	for _, i := range pcrs {
		sel[i/8] |= 1 << (i % 8)
	}
	for i := 0; i < 24; i++ {
		if sel[i/8]&(1<<(i%8)) != 0 {
			dig.Write(vals[bank][i])
		}
	}
	return h.attest(t, tpm2.TPMSTAttestQuote, nonce, tpm2.NewTPMUAttest(tpm2.TPMSTAttestQuote, &tpm2.TPMSQuoteInfo{
		PCRSelect: tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{Hash: bankAlg(bank), PCRSelect: sel}}},
		PCRDigest: tpm2.TPM2BDigest{Buffer: dig.Sum(nil)},
	}))
}

var quotedPCRs = []int{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}

// evidence returns faithful evidence for nonce.
func (h *fakeHost) evidence(t testing.TB, nonce []byte) *Evidence {
	t.Helper()
	ci := h.certify(t, nonce, name(t, h.mkPub))
	q := h.quote(t, nonce, "sha256", quotedPCRs, h.pcrs)
	ev := &Evidence{
		Format: EvidenceFormat, Version: EvidenceVersion, HostID: "host-b", Nonce: nonce,
		EKCert: h.ekCert, EKPublic: h.ekPub, AKPublic: tpm2.Marshal(h.akPub), MKPublic: tpm2.Marshal(h.mkPub),
		MKCertifyInfo: ci, MKCertifySig: h.sign(t, ci),
		Quotes:   []QuoteBlob{{Attest: q, Signature: h.sign(t, q)}},
		EventLog: h.log, ProducedAt: h.now.Add(-10 * time.Second),
	}
	ev.SetPCRValues(h.pcrs)
	return ev
}

// enrolled returns enrolments holding this host's (EK, AK) activation.
func (h *fakeHost) enrolled(t testing.TB) *MemoryEnrollments {
	t.Helper()
	ek, err := ParsePublic("EK", h.ekPub)
	if err != nil {
		t.Fatal(err)
	}
	m := &MemoryEnrollments{}
	if err := m.Add(context.Background(), Enrollment{Host: "host-b", EKDigest: ek.Digest(), AKName: name(t, h.akPub), EnrolledAt: testNow}); err != nil {
		t.Fatal(err)
	}
	return m
}

// policy returns a policy that this host satisfies.
func (h *fakeHost) policy(t testing.TB) *Policy {
	t.Helper()
	l, err := ParseEventLog(h.log)
	if err != nil {
		t.Fatal(err)
	}
	p, err := GoldenFromEventLog(l, "sha256", quotedPCRs)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func (h *fakeHost) verifier(t testing.TB) *Verifier {
	t.Helper()
	c, err := ParseCertificate(h.caDER)
	if err != nil {
		t.Fatal(err)
	}
	return &Verifier{Roots: NewRootStore(c), Policy: h.policy(t), Enrollments: h.enrolled(t), Clock: func() time.Time { return h.now }}
}

func testNonce(b byte) []byte {
	n := make([]byte, 32)
	for i := range n {
		n[i] = b + byte(i)
	}
	return n
}
