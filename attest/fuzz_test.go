package attest

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/google/go-tpm/tpm2"
)

func addFiles(f *testing.F, glob string) {
	f.Helper()
	files, _ := filepath.Glob(filepath.Join(rw, glob))
	for _, p := range files {
		if b, err := os.ReadFile(p); err == nil {
			f.Add(b)
		}
	}
}

func FuzzDecodeEvidence(f *testing.F) {
	h := newFakeHost(f)
	good, _ := h.evidence(f, testNonce(1)).Encode()
	f.Add(good)
	fx := newAKCertFixture(f)
	v2, _ := fx.evidence(f, testNonce(1)).Encode()
	f.Add(v2)
	f.Add([]byte(`{"format":"vtpmm-evidence","version":1}`))
	f.Add([]byte(`{"format":"vtpmm-evidence","version":7,"host_id":"x"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		ev, err := DecodeEvidence(data)
		if err != nil {
			return
		}
		// Whatever decodes must be safe to verify.
		v := h.verifier(t)
		_, _ = v.Verify(t.Context(), ev, ev.Nonce)
	})
}

func FuzzParseCertificates(f *testing.F) {
	addFiles(f, "ekcerts/*/*")
	addFiles(f, "roots/STM_RSA_02I.pem")
	f.Fuzz(func(t *testing.T, data []byte) {
		certs, err := ParseCertificates(data)
		if err != nil {
			return
		}
		store := NewRootStore(certs...)
		for _, c := range certs {
			_ = c.Label()
			_, _ = store.VerifyEK(c, certs, CertPolicy{CheckValidity: true}, pinnedNow)
		}
	})
}

func FuzzParseEventLog(f *testing.F) {
	addFiles(f, "eventlogs/*.bin")
	addFiles(f, "eventlogs/*_eventlog")
	if b, err := os.ReadFile(filepath.Join(field, "eventlogs", "hcrtm-swtpm.bin")); err == nil {
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		l, err := ParseEventLog(data)
		if err != nil {
			return
		}
		_ = l.Replay()
		_, _ = l.Facts()
		_, _ = l.PCR0Locality()
		_ = l.replayNote()
		for i := range l.Events {
			_ = l.Events[i].Describe()
		}
	})
}

func FuzzTPMStructures(f *testing.F) {
	addFiles(f, "attestations/extracted/*.bin")
	f.Fuzz(func(t *testing.T, data []byte) {
		if p, err := ParsePublic("x", data); err == nil {
			_, _ = p.Name()
			_, _ = p.CryptoKey()
			_ = CheckAK(p)
		}
		_, _ = ParseAttest(data, tpmSTAttestQuote)
		_, _ = VerifyTPMSignature(nil, data, data)
	})
}

// FuzzFastDecoders checks the hand-written TPMS_ATTEST and TPMT_SIGNATURE
// decoders against go-tpm's: whatever the fast path accepts, the
// reflection path accepts with the same fields (the fast path may decline
// more; the verifier then falls back to the reflection path).
func FuzzFastDecoders(f *testing.F) {
	addFiles(f, "attestations/extracted/*.bin")
	files, _ := filepath.Glob(filepath.Join(field, "quotes", "*.bin"))
	for _, p := range files {
		if b, err := os.ReadFile(p); err == nil {
			f.Add(b)
		}
	}
	h := newFakeHost(f)
	ev := h.evidence(f, testNonce(1))
	f.Add(ev.MKCertifyInfo)
	f.Add(ev.MKCertifySig)
	f.Add(ev.Quotes[0].Attest)
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, typ := range []uint16{tpmSTAttestQuote, tpmSTAttestCertify} {
			fa, err := decodeAttestFast(data, typ)
			if err != nil {
				continue
			}
			att, err := ParseAttest(data, typ)
			if err != nil {
				t.Fatalf("fast path accepts a TPMS_ATTEST (type %x) go-tpm refuses: %v", typ, err)
			}
			if !bytes.Equal(fa.extraData, att.A.ExtraData.Buffer) || fa.clock != att.A.ClockInfo.Clock || fa.resetCount != att.A.ClockInfo.ResetCount {
				t.Fatal("fast and reflection TPMS_ATTEST headers differ")
			}
			switch typ {
			case tpmSTAttestQuote:
				info, err := att.A.Attested.Quote()
				if err != nil {
					t.Fatal(err)
				}
				sels, err := selections(info.PCRSelect)
				if err != nil || !reflect.DeepEqual(sels, fa.sels) || !bytes.Equal(info.PCRDigest.Buffer, fa.pcrDigest) {
					t.Fatalf("quote info differs: %v %v / %v", err, sels, fa.sels)
				}
			case tpmSTAttestCertify:
				info, err := att.A.Attested.Certify()
				if err != nil || !bytes.Equal(info.Name.Buffer, fa.name) || !bytes.Equal(info.QualifiedName.Buffer, fa.qualifiedName) {
					t.Fatalf("certify info differs: %v", err)
				}
			}
		}
		if fs, err := decodeSignatureFast(data); err == nil {
			sig, err := unmarshal[tpm2.TPMTSignature]("TPMT_SIGNATURE", data)
			if err != nil {
				t.Fatalf("fast path accepts a TPMT_SIGNATURE go-tpm refuses: %v", err)
			}
			if sig.SigAlg != fs.alg {
				t.Fatalf("signature algorithm %v, fast %v", sig.SigAlg, fs.alg)
			}
			var hash tpm2.TPMIAlgHash
			switch fs.alg {
			case tpm2.TPMAlgRSASSA, tpm2.TPMAlgRSAPSS:
				var s *tpm2.TPMSSignatureRSA
				if fs.alg == tpm2.TPMAlgRSASSA {
					s, err = sig.Signature.RSASSA()
				} else {
					s, err = sig.Signature.RSAPSS()
				}
				if err != nil || !bytes.Equal(s.Sig.Buffer, fs.rsa) {
					t.Fatalf("RSA signature differs: %v", err)
				}
				hash = s.Hash
			case tpm2.TPMAlgECDSA:
				s, err := sig.Signature.ECDSA()
				if err != nil || !bytes.Equal(s.SignatureR.Buffer, fs.r) || !bytes.Equal(s.SignatureS.Buffer, fs.s) {
					t.Fatalf("ECDSA signature differs: %v", err)
				}
				hash = s.Hash
			}
			if h, err := hash.Hash(); err != nil || h != fs.hash {
				t.Fatalf("hash %v (%v), fast %v", h, err, fs.hash)
			}
		}
	})
}

// FuzzAKCertificate feeds AK certificates to the AK certificate checks:
// the subjectAltName decoder (EK permanent identifier, hardware module
// name, TPM directoryName), the usage rule and a whole enrolment.
func FuzzAKCertificate(f *testing.F) {
	fx := newAKCertFixture(f)
	f.Add(fx.akCert)
	addFiles(f, "attestations/extracted/gce-cos-85.akcert.pem")
	addFiles(f, "ekcerts/gce/uca_*")
	v := fx.verifier(f, EnrollEither)
	ek, err := ParsePublic("EK", fx.h.ekPub)
	if err != nil {
		f.Fatal(err)
	}
	ekCert, err := ParseCertificate(fx.h.ekCert)
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if certs, err := ParseCertificates(data); err == nil {
			for _, c := range certs {
				_, _ = parseTPMSAN(c.RawSAN)
				_ = checkAKCertUsage(c)
				_, _, _ = akBinding(c, ek, ekCert)
			}
		}
		_, _ = parseTPMSAN(data)
		req := fx.request(data)
		if _, err := v.EnrollByAKCertificate(context.Background(), req); err == nil && !bytes.Equal(data, fx.akCert) {
			// Only a certificate for this AK from this CA can pass.
			c, perr := ParseCertificates(data)
			if perr != nil || !bytes.Equal(c[0].RawTBS, mustParse(t, fx.akCert).RawTBS) {
				t.Fatalf("a fuzzed AK certificate was accepted")
			}
		}
	})
}

func mustParse(t *testing.T, der []byte) *Cert {
	t.Helper()
	c, err := ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// FuzzParsePolicy: whatever parses validates and marshals again.
func FuzzParsePolicy(f *testing.F) {
	h := newFakeHost(f)
	good, _ := h.policy(f).Marshal()
	f.Add(good)
	f.Add([]byte("version: 1\nquote: {bank: sha256, pcrs: [0]}\nenrollment: either\nak_certificate: {require_ek_binding: true}\nek: {strict: true, allow_sha1: true}\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		p, err := ParsePolicy(data)
		if err != nil {
			return
		}
		_ = p.Deprecations()
		if _, err := p.Marshal(); err != nil {
			t.Fatal(err)
		}
	})
}
