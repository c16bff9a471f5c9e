package attest

import (
	"context"
	"crypto"
	"crypto/rsa"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
)

// TestAKCertRealGCE: the real GCE AK certificate (go-tpm-tools COS-85
// attestation) certifies the real AK public area and chains to Google's
// root; it carries only a TPM directoryName, so the binding is a warning.
func TestAKCertRealGCE(t *testing.T) {
	gce := filepath.Join(rw, "ekcerts", "gce")
	akRoots := NewRootStore(mustCerts(t, filepath.Join(gce, "tpm_ek_root_1.cer"))...)
	inter := mustCerts(t, filepath.Join(gce, "tpm_ek_intermediate_2.crt"))[0].Raw
	akPub, err := ParsePublic("AK", readFile(t, "attestations/extracted/gce-cos-85.akpub.tpmt_public.bin"))
	if err != nil {
		t.Fatal(err)
	}
	akCert := mustCerts(t, filepath.Join(rw, "attestations/extracted/gce-cos-85.akcert.pem"))[0].Raw
	// Its EK: a public area built around the key of a real GCE EK
	// certificate (another VM of the same platform).
	ek := publicFor(t, mustCerts(t, filepath.Join(gce, "uca_tpm_rsa_enc_cert.pem"))[0].PublicKey, tpm2.RSAEKTemplate)
	v := &Verifier{AKRoots: akRoots, Policy: &Policy{}}
	c, err := v.verifyAKCert(akPub, ek, nil, akCert, [][]byte{inter}, pinnedNow)
	if err != nil {
		t.Fatalf("real GCE AK certificate refused: %v", err)
	}
	if c.named || len(c.path.chain) != 3 {
		t.Fatalf("named %v, chain:\n%s", c.named, c.path.chain)
	}
	// The same certificate for another AK, and under another root.
	other := publicFor(t, mustCerts(t, filepath.Join(gce, "uca_tpm_rsa_sign_cert.pem"))[0].PublicKey, akRSATemplate())
	_, err = v.verifyAKCert(other, ek, nil, akCert, [][]byte{inter}, pinnedNow)
	wantRefusal(t, err, RuleAKCertKey)
	v.AKRoots = mustStore(t, filepath.Join(rw, "roots"))
	_, err = v.verifyAKCert(akPub, ek, nil, akCert, [][]byte{inter}, pinnedNow)
	wantRefusal(t, err, RuleAKCertChain)
}

// TestEnrollRealGCEPair enrols on a real GCE AK certificate and EK
// certificate of the same VM (uca_tpm_rsa_sign_cert, uca_tpm_rsa_enc_cert):
// the public areas are built around the certified keys (the data set has
// no TPMT_PUBLIC for them). Both certificates name the TPM (GOOG vTPM
// 20160511): the names agree, the certificate does not name the EK itself.
func TestEnrollRealGCEPair(t *testing.T) {
	gce := filepath.Join(rw, "ekcerts", "gce")
	ekCert := mustCerts(t, filepath.Join(gce, "uca_tpm_rsa_enc_cert.pem"))[0]
	akCert := mustCerts(t, filepath.Join(gce, "uca_tpm_rsa_sign_cert.pem"))[0]
	roots := NewRootStore(mustCerts(t, filepath.Join(gce, "tpm_ek_root_1.cer"))...)
	inter := mustCerts(t, filepath.Join(gce, "tpm_ek_intermediate_3.crt"))[0].Raw
	v := &Verifier{Roots: roots, AKRoots: roots, Policy: &Policy{Enrollment: EnrollEither, AKCert: AKCertPolicy{}},
		Enrollments: &MemoryEnrollments{}, Clock: func() time.Time { return pinnedNow }}
	req := AKCertEnrollment{
		Host:     "gce-vm",
		EKPublic: tpm2.Marshal(*publicFor(t, ekCert.PublicKey, tpm2.RSAEKTemplate).Pub), EKCert: ekCert.Raw, EKIntermediates: [][]byte{inter},
		AKPublic: tpm2.Marshal(*publicFor(t, akCert.PublicKey, akRSATemplate()).Pub), AKCert: akCert.Raw, AKIntermediates: [][]byte{inter},
	}
	res, err := v.EnrollByAKCertificate(context.Background(), req)
	if err != nil {
		t.Fatalf("%v\n%s", err, res.Explain())
	}
	if !strings.Contains(res.Explain(), "WARN ak-cert-binding") || !strings.Contains(res.Explain(), "TPM id:474F4F47 vTPM id:20160511 as in the EK certificate") {
		t.Fatalf("explain:\n%s", res.Explain())
	}
	t.Log("\n" + res.Explain())
}

// akRSATemplate is a restricted RSA signing key (the GCE AK's shape).
func akRSATemplate() tpm2.TPMTPublic {
	return tpm2.TPMTPublic{
		Type: tpm2.TPMAlgRSA, NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{FixedTPM: true, FixedParent: true, SensitiveDataOrigin: true, UserWithAuth: true, Restricted: true, SignEncrypt: true},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgRSA, &tpm2.TPMSRSAParms{
			Scheme:  tpm2.TPMTRSAScheme{Scheme: tpm2.TPMAlgRSASSA, Details: tpm2.NewTPMUAsymScheme(tpm2.TPMAlgRSASSA, &tpm2.TPMSSigSchemeRSASSA{HashAlg: tpm2.TPMAlgSHA256})},
			KeyBits: 2048,
		}),
	}
}

// publicFor builds a TPMT_PUBLIC of template shape around an RSA key.
func publicFor(t testing.TB, key crypto.PublicKey, tmpl tpm2.TPMTPublic) *Public {
	t.Helper()
	n, ok := key.(*rsa.PublicKey)
	if !ok {
		t.Fatalf("key %T, want RSA", key)
	}
	tmpl.Unique = tpm2.NewTPMUPublicID(tpm2.TPMAlgRSA, &tpm2.TPM2BPublicKeyRSA{Buffer: n.N.Bytes()})
	p, err := ParsePublic("test", tpm2.Marshal(tmpl))
	if err != nil {
		t.Fatal(err)
	}
	return p
}
