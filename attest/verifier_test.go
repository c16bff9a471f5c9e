package attest

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
)

func TestVerifyAccepts(t *testing.T) {
	h := newFakeHost(t)
	v := h.verifier(t)
	nonce := testNonce(1)
	res, err := v.Verify(context.Background(), h.evidence(t, nonce), nonce)
	if err != nil {
		t.Fatalf("%v\n%s", err, res.Explain())
	}
	if len(res.MKPublic) == 0 || len(res.EKChain) != 2 {
		t.Fatalf("result incomplete: %+v", res)
	}
	for _, s := range res.Steps {
		if s.Outcome == "fail" {
			t.Fatalf("failed step in accepted result: %+v", s)
		}
	}
	t.Log("\n" + res.Explain())
}

// TestVerifyRefusals has one case per refusal rule.
func TestVerifyRefusals(t *testing.T) {
	h := newFakeHost(t)
	nonce := testNonce(1)
	other := testNonce(100)
	tests := []struct {
		name    string
		mutate  func(t *testing.T, ev *Evidence, v *Verifier) []byte // returns the nonce to verify with
		rule    Rule
		wantErr error
	}{
		{"untrusted root", func(t *testing.T, ev *Evidence, v *Verifier) []byte {
			other := newFakeHost(t)
			ev.EKCert = other.issueEKCert(t, &h.ekKey.PublicKey)
			return nonce
		}, RuleEKChain, ErrEKUntrustedRoot},
		{"flipped byte in EK certificate signature", func(t *testing.T, ev *Evidence, v *Verifier) []byte {
			ev.EKCert = append([]byte(nil), ev.EKCert...)
			ev.EKCert[len(ev.EKCert)-5] ^= 1
			return nonce
		}, RuleEKSignature, ErrEKSignature},
		{"EK certificate for another key", func(t *testing.T, ev *Evidence, v *Verifier) []byte {
			ev.EKCert = h.issueEKCert(t, &h.akKey.PublicKey)
			return nonce
		}, RuleEKPublic, ErrEKMismatch},
		{"EK certificate expired under check_validity", func(t *testing.T, ev *Evidence, v *Verifier) []byte {
			v.Policy.EK.CheckValidity = true
			v.Clock = func() time.Time { return testNow.Add(48 * time.Hour) }
			v.Policy.MaxEvidenceAge = 0
			return nonce
		}, RuleEKValidity, ErrEKExpired},
		{"AK never activated with this EK", func(t *testing.T, ev *Evidence, v *Verifier) []byte {
			v.Enrollments = &MemoryEnrollments{}
			return nonce
		}, RuleAKActivation, ErrAKNotActivated},
		{"AK is not restricted", func(t *testing.T, ev *Evidence, v *Verifier) []byte {
			ak := h.akPub
			ak.ObjectAttributes.Restricted = false
			ev.AKPublic = tpm2.Marshal(ak)
			return nonce
		}, RuleAKAttributes, ErrAKAttributes},
		{"MK without fixedTPM", func(t *testing.T, ev *Evidence, v *Verifier) []byte {
			mk := h.mkPub
			mk.ObjectAttributes.FixedTPM = false
			ev.MKPublic = tpm2.Marshal(mk)
			ev.MKCertifyInfo = h.certify(t, nonce, name(t, mk))
			ev.MKCertifySig = h.sign(t, ev.MKCertifyInfo)
			return nonce
		}, RuleMKAttributes, ErrMKAttributes},
		{"MK is a signing key", func(t *testing.T, ev *Evidence, v *Verifier) []byte {
			mk := h.mkPub
			mk.ObjectAttributes.SignEncrypt = true
			ev.MKPublic = tpm2.Marshal(mk)
			ev.MKCertifyInfo = h.certify(t, nonce, name(t, mk))
			ev.MKCertifySig = h.sign(t, ev.MKCertifyInfo)
			return nonce
		}, RuleMKAttributes, ErrMKAttributes},
		{"MK name does not match its public area", func(t *testing.T, ev *Evidence, v *Verifier) []byte {
			mk := h.mkPub
			mk.ObjectAttributes.NoDA = false // another key, same certification
			ev.MKPublic = tpm2.Marshal(mk)
			return nonce
		}, RuleMKName, ErrMKName},
		{"MK authPolicy differs from policy", func(t *testing.T, ev *Evidence, v *Verifier) []byte {
			v.Policy.MK.AuthPolicy = make([]byte, 32)
			return nonce
		}, RuleMKPolicy, ErrMKPolicy},
		{"certify nonce mismatch", func(t *testing.T, ev *Evidence, v *Verifier) []byte {
			ev.MKCertifyInfo = h.certify(t, other, name(t, h.mkPub))
			ev.MKCertifySig = h.sign(t, ev.MKCertifyInfo)
			return nonce
		}, RuleCertifyNonce, ErrCertifyNonce},
		{"certify signed by another key", func(t *testing.T, ev *Evidence, v *Verifier) []byte {
			ev.MKCertifySig = newFakeHost(t).sign(t, ev.MKCertifyInfo)
			return nonce
		}, RuleCertifySignature, ErrCertifySignature},
		{"replayed quote with an old nonce", func(t *testing.T, ev *Evidence, v *Verifier) []byte {
			old := h.evidence(t, other)
			ev.Quotes = old.Quotes
			return nonce
		}, RuleQuoteNonce, ErrQuoteNonce},
		{"quote signature by another key", func(t *testing.T, ev *Evidence, v *Verifier) []byte {
			ev.Quotes[0].Signature = newFakeHost(t).sign(t, ev.Quotes[0].Attest)
			return nonce
		}, RuleQuoteSignature, ErrQuoteSignature},
		{"reported PCR differs from quoted digest", func(t *testing.T, ev *Evidence, v *Verifier) []byte {
			ev.PCRs["sha256"]["3"] = make(HexBytes, 32)
			return nonce
		}, RulePCRDigest, ErrPCRDigest},
		{"quote does not cover a policy PCR", func(t *testing.T, ev *Evidence, v *Verifier) []byte {
			v.Policy.Quote.PCRs = append(v.Policy.Quote.PCRs, 14)
			return nonce
		}, RulePCRSelection, ErrPCRSelection},
		{"PCR mismatch with golden value", func(t *testing.T, ev *Evidence, v *Verifier) []byte {
			v.Policy.GoldenPCRs["sha256"]["7"] = HexList{make(HexBytes, 32)}
			return nonce
		}, RulePCRPolicy, ErrPCRPolicy},
		{"event log that does not replay", func(t *testing.T, ev *Evidence, v *Verifier) []byte {
			ev.EventLog = readFile(t, "eventlogs/ubuntu-2104-no-secure-boot.bin")
			v.Policy.GoldenPCRs = nil
			return nonce
		}, RuleEventLogReplay, ErrEventLogReplay},
		{"no event log under a policy requiring one", func(t *testing.T, ev *Evidence, v *Verifier) []byte {
			ev.EventLog = nil
			return nonce
		}, RuleEventLogReplay, ErrEventLogReplay},
		{"secure boot off under a policy requiring it", func(t *testing.T, ev *Evidence, v *Verifier) []byte {
			*ev = *bootWith(t, h, "eventlogs/ubuntu-2104-no-secure-boot.bin", nonce)
			v.Policy.GoldenPCRs = nil
			v.Policy.EventLog.AllowedBootComponents = nil
			return nonce
		}, RuleSecureBoot, ErrSecureBootOff},
		{"boot component not allowed", func(t *testing.T, ev *Evidence, v *Verifier) []byte {
			v.Policy.EventLog.AllowedBootComponents = v.Policy.EventLog.AllowedBootComponents[1:]
			return nonce
		}, RuleBootComponent, ErrBootComponent},
		{"evidence for another nonce", func(t *testing.T, ev *Evidence, v *Verifier) []byte {
			return other
		}, RuleNonce, ErrStaleEvidence},
		{"evidence too old", func(t *testing.T, ev *Evidence, v *Verifier) []byte {
			ev.ProducedAt = testNow.Add(-time.Hour)
			return nonce
		}, RuleEvidenceAge, ErrStaleEvidence},
		{"missing MK", func(t *testing.T, ev *Evidence, v *Verifier) []byte {
			ev.MKPublic = nil
			return nonce
		}, RuleEvidenceFormat, ErrMalformedEvidence},
		{"garbage AK public", func(t *testing.T, ev *Evidence, v *Verifier) []byte {
			ev.AKPublic = []byte{0, 0x23, 0xff}
			return nonce
		}, RuleEvidenceFormat, ErrMalformedEvidence},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v := h.verifier(t)
			ev := h.evidence(t, nonce)
			n := tt.mutate(t, ev, v)
			res, err := v.Verify(context.Background(), ev, n)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("err = %v, want %v", err, tt.wantErr)
			}
			var re *RefusalError
			if !errors.As(err, &re) || re.Rule != tt.rule || re.Host != "host-b" {
				t.Fatalf("err = %#v, want rule %s for host-b", err, tt.rule)
			}
			if !strings.HasPrefix(err.Error(), "host-b: rule "+string(tt.rule)+": ") {
				t.Fatalf("message %q does not name host and rule", err)
			}
			last := res.Steps[len(res.Steps)-1]
			if last.Outcome != "fail" || last.Rule != tt.rule {
				t.Fatalf("last step %+v, want fail of %s", last, tt.rule)
			}
		})
	}
}

// bootWith returns evidence of a host booted from another real log.
func bootWith(t *testing.T, h *fakeHost, logFile string, nonce []byte) *Evidence {
	t.Helper()
	h2 := *h
	h2.log = readFile(t, logFile)
	l, err := ParseEventLog(h2.log)
	if err != nil {
		t.Fatal(err)
	}
	h2.pcrs = PCRValues{"sha256": l.Replay()["sha256"]}
	return h2.evidence(t, nonce)
}

func TestVerifyNonceSingleUse(t *testing.T) {
	h := newFakeHost(t)
	v := h.verifier(t)
	book := &NonceBook{TTL: time.Minute, Clock: v.Clock, Rand: constReader(7)}
	v.Nonces = book
	nonce, err := book.Issue()
	if err != nil {
		t.Fatal(err)
	}
	ev := h.evidence(t, nonce)
	if _, err := v.Verify(context.Background(), ev, nonce); err != nil {
		t.Fatalf("first use: %v", err)
	}
	_, err = v.Verify(context.Background(), ev, nonce)
	var re *RefusalError
	if !errors.Is(err, ErrStaleEvidence) || !errors.As(err, &re) || re.Rule != RuleNonce {
		t.Fatalf("replay: err = %v, want rule nonce / ErrStaleEvidence", err)
	}
}

type constReader byte

func (c constReader) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = byte(c) + byte(i)
	}
	return len(p), nil
}

// TestVerifyEnrolledEKWithoutCertificate: a TPM without a usable EK
// certificate is accepted only through its enrolment record.
func TestVerifyEnrolledEKWithoutCertificate(t *testing.T) {
	h := newFakeHost(t)
	nonce := testNonce(1)
	for _, tc := range []struct {
		name     string
		enrolled bool
		wantErr  error
	}{{"enrolled", true, nil}, {"not enrolled", false, ErrAKNotActivated}} {
		t.Run(tc.name, func(t *testing.T) {
			v := h.verifier(t)
			v.Roots = nil
			if !tc.enrolled {
				v.Enrollments = &MemoryEnrollments{}
			}
			ev := h.evidence(t, nonce)
			ev.EKCert = nil
			res, err := v.Verify(context.Background(), ev, nonce)
			if !errors.Is(err, tc.wantErr) && !(tc.wantErr == nil && err == nil) {
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
			if res.Steps[3].Rule != RuleEKChain || res.Steps[3].Outcome != "skip" {
				t.Fatalf("step 3 = %+v, want skipped ek-chain", res.Steps[3])
			}
		})
	}
}

func TestNonceBook(t *testing.T) {
	now := testNow
	book := &NonceBook{TTL: time.Minute, Clock: func() time.Time { return now }, Rand: constReader(1)}
	n1, err := book.Issue()
	if err != nil {
		t.Fatal(err)
	}
	book.Rand = constReader(2)
	n2, err := book.Issue()
	if err != nil {
		t.Fatal(err)
	}
	if err := book.Consume(n1); err != nil {
		t.Fatalf("fresh nonce: %v", err)
	}
	for name, n := range map[string][]byte{"reused": n1, "never issued": testNonce(9)} {
		if err := book.Consume(n); !errors.Is(err, ErrStaleEvidence) {
			t.Errorf("%s: err = %v, want ErrStaleEvidence", name, err)
		}
	}
	now = now.Add(2 * time.Minute)
	if err := book.Consume(n2); !errors.Is(err, ErrStaleEvidence) {
		t.Fatalf("expired: err = %v", err)
	}
}
