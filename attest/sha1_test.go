package attest

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestSHA1VendorChains: real EK certificates signed with sha1WithRSA by
// their vendor CA (STMicro ST33ZP24 from HIRS, two of them from Intel
// NUCs; an Infineon TPM 1.2 EK as read from NV) verify under the keylime
// trust store by default, are refused when ek.strict is set, and a
// tampered copy is refused for its bad signature either way.
func TestSHA1VendorChains(t *testing.T) {
	store := mustStore(t, filepath.Join(rw, "roots"))
	leaves := []struct {
		name, path string
	}{
		{"STM ST33ZP24 (HIRS ab21ccf2)", filepath.Join(rw, "ekcerts/stm/ab21ccf2-tpmcert.pem")},
		{"STM ST33ZP24 in an Intel NUC (HIRS nuc-1)", filepath.Join(field, "ekcerts/stm-nuc/nuc-1-tpmcert.pem")},
		{"STM ST33ZP24 in an Intel NUC (HIRS nuc-2)", filepath.Join(field, "ekcerts/stm-nuc/nuc-2-tpmcert.pem")},
		{"Infineon TPM 1.2 EK with NV header", filepath.Join(rw, "ekcerts/ifx-tpm12/ek_cert_with_security_assertions.cer")},
	}
	for _, l := range leaves {
		t.Run(l.name, func(t *testing.T) {
			leaf := mustCerts(t, l.path)[0]
			chain, err := store.VerifyEK(leaf, nil, CertPolicy{}, pinnedNow)
			if err != nil {
				t.Fatalf("default policy refused a real vendor SHA-1 chain: %v", err)
			}
			if d := chain.SHA1Depths(); len(d) == 0 || d[0] != 0 {
				t.Fatalf("SHA-1 depths %v, want the leaf", d)
			}
			if w := chain.sha1Warning(); !strings.Contains(w, "ek.strict") {
				t.Fatalf("warning %q does not say how to refuse", w)
			}
			_, err = store.VerifyEK(leaf, nil, CertPolicy{Strict: true}, pinnedNow)
			var re *RefusalError
			if !errors.Is(err, ErrEKSignature) || !errors.As(err, &re) || !strings.Contains(re.Detail, "SHA-1") || !strings.Contains(re.Detail, "ek.strict") {
				t.Fatalf("strict: err = %v, want an ek-signature SHA-1 refusal", err)
			}
			for _, pol := range []CertPolicy{{}, {Strict: true}} {
				raw := append([]byte(nil), leaf.Raw...)
				raw[len(leaf.RawTBS)/2] ^= 0x01 // inside the TBS (subject public key)
				c, err := ParseCertificate(raw)
				if err != nil {
					t.Fatal(err)
				}
				_, err = store.VerifyEK(c, nil, pol, pinnedNow)
				if !errors.Is(err, ErrEKSignature) {
					t.Fatalf("tampered, strict=%v: err = %v, want ErrEKSignature", pol.Strict, err)
				}
				if !pol.Strict && !strings.Contains(err.Error(), "bad signature") {
					t.Fatalf("tampered: %v, want a bad-signature refusal", err)
				}
			}
		})
	}
}

// TestSHA1IntermediateAccepted: the Infineon TPM 1.2 chain has SHA-1 on
// every link (leaf and intermediates); all are accepted and listed.
func TestSHA1IntermediateAccepted(t *testing.T) {
	root := NewRootStore(mustCerts(t, filepath.Join(rw, "ekcerts", "ifx-tpm12", "IFX-RootCA.crt"))...)
	inter := append(mustCerts(t, filepath.Join(rw, "ekcerts", "ifx-tpm12", "IFX_RSA_08I.pem")), mustCerts(t, filepath.Join(rw, "ekcerts", "ifx-tpm12", "IFX_RSA_RT.pem"))...)
	leaf := mustCerts(t, filepath.Join(rw, "ekcerts", "ifx-tpm12", "ek_cert_with_security_assertions.cer"))[0]
	chain, err := root.VerifyEK(leaf, inter, CertPolicy{}, pinnedNow)
	if err != nil {
		t.Fatal(err)
	}
	if d := chain.SHA1Depths(); len(d) != 3 {
		t.Fatalf("SHA-1 depths %v, want 0, 1, 2:\n%s", d, chain)
	}
}

// TestSHA1QuoteRefused: the real Windows GCP quote (go-attestation
// testdata) is a genuine RSASSA-SHA1 signature by its AK, and the verifier
// refuses it: SHA-1 is accepted on EK paths only.
func TestSHA1QuoteRefused(t *testing.T) {
	read := func(n string) []byte {
		b, err := os.ReadFile(filepath.Join(field, "quotes", n))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	ak, err := ParsePublic("AK", read("windows-gcp-sha1.akpub.tpmt_public.bin"))
	if err != nil {
		t.Fatal(err)
	}
	att, sig := read("windows-gcp-sha1.quote.tpms_attest.bin"), read("windows-gcp-sha1.quote.tpmt_signature.bin")
	// The signature is genuine: RSASSA-PKCS1-v1_5 with SHA-1 over the attest.
	key, err := ak.CryptoKey()
	if err != nil {
		t.Fatal(err)
	}
	d := sha1.Sum(att)
	if err := rsa.VerifyPKCS1v15(key.(*rsa.PublicKey), crypto.SHA1, d[:], sig[6:]); err != nil {
		t.Fatalf("the real SHA-1 quote does not verify by hand: %v", err)
	}
	_, err = VerifyQuote(ak, att, sig, nil, PCRValues{})
	var re *RefusalError
	if !errors.Is(err, ErrQuoteSignature) || !errors.Is(err, ErrSHA1Signature) || !errors.As(err, &re) || re.Rule != RuleQuoteSignature {
		t.Fatalf("err = %v, want a quote-signature refusal for SHA-1", err)
	}
	if !strings.Contains(re.Detail, "SHA-1") {
		t.Fatalf("detail %q does not name SHA-1", re.Detail)
	}
}

// TestVerifySHA1EKExplain: evidence whose EK certificate is signed with
// SHA-1 passes by default with a WARN step, and is refused under
// ek.strict.
func TestVerifySHA1EKExplain(t *testing.T) {
	h := newFakeHost(t)
	nonce := testNonce(1)
	ev := h.evidence(t, nonce)
	ev.EKCert = resignSHA1(t, ev.EKCert, h.caKey)
	v := h.verifier(t)
	res, err := v.Verify(context.Background(), ev, nonce)
	if err != nil {
		t.Fatalf("%v\n%s", err, res.Explain())
	}
	if !strings.Contains(res.Explain(), "WARN ek-signature") || len(res.Warnings()) != 1 {
		t.Fatalf("no SHA-1 warning:\n%s", res.Explain())
	}
	v = h.verifier(t)
	v.Policy.EK.Strict = true
	_, err = v.Verify(context.Background(), ev, nonce)
	if !errors.Is(err, ErrEKSignature) || !strings.Contains(err.Error(), "ek.strict") {
		t.Fatalf("strict: err = %v", err)
	}
}

var (
	oidSigSHA1WithRSA   = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 1, 5}
	oidSigECDSAWithSHA1 = asn1.ObjectIdentifier{1, 2, 840, 10045, 4, 1}
)

// resignSHA1 rewrites a certificate's signature algorithm to SHA-1 (RSA or
// ECDSA by the key) and signs it again with key (crypto/x509 no longer
// creates SHA-1 signatures).
func resignSHA1(t testing.TB, der []byte, key crypto.Signer) []byte {
	t.Helper()
	var cert struct {
		TBS asn1.RawValue
		Alg pkix.AlgorithmIdentifier
		Sig asn1.BitString
	}
	if _, err := asn1.Unmarshal(der, &cert); err != nil {
		t.Fatal(err)
	}
	alg := pkix.AlgorithmIdentifier{Algorithm: oidSigECDSAWithSHA1}
	if _, ok := key.Public().(*rsa.PublicKey); ok {
		alg = pkix.AlgorithmIdentifier{Algorithm: oidSigSHA1WithRSA, Parameters: asn1.NullRawValue}
	}
	algDER, err := asn1.Marshal(alg)
	if err != nil {
		t.Fatal(err)
	}
	var elems [][]byte
	for rest := cert.TBS.Bytes; len(rest) > 0; {
		var rv asn1.RawValue
		var err error
		if rest, err = asn1.Unmarshal(rest, &rv); err != nil {
			t.Fatal(err)
		}
		elems = append(elems, rv.FullBytes)
	}
	i := 1 // [version, serial, signature, ...]
	if len(elems[0]) > 0 && elems[0][0] == 0xa0 {
		i = 2
	}
	elems[i] = algDER
	var content []byte
	for _, e := range elems {
		content = append(content, e...)
	}
	tbs, err := asn1.Marshal(asn1.RawValue{Class: asn1.ClassUniversal, Tag: asn1.TagSequence, IsCompound: true, Bytes: content})
	if err != nil {
		t.Fatal(err)
	}
	d := sha1.Sum(tbs)
	var sig []byte
	switch k := key.(type) {
	case *ecdsa.PrivateKey:
		sig, err = ecdsa.SignASN1(rand.Reader, k, d[:])
	default:
		sig, err = key.Sign(rand.Reader, d[:], crypto.SHA1)
	}
	if err != nil {
		t.Fatal(err)
	}
	out, err := asn1.Marshal(struct {
		TBS asn1.RawValue
		Alg pkix.AlgorithmIdentifier
		Sig asn1.BitString
	}{asn1.RawValue{FullBytes: tbs}, alg, asn1.BitString{Bytes: sig, BitLength: 8 * len(sig)}})
	if err != nil {
		t.Fatal(err)
	}
	return out
}
