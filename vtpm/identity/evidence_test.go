package identity_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/vtpmm/vtpmm/attest"
	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/identity"
	"github.com/vtpmm/vtpmm/vtpm/tpmtest"
)

var testNow = time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC)

// enrol runs the credential activation loop against the verifier side and
// records the enrolment.
func enrol(t *testing.T, h *host, id *identity.Identity, name string, enr attest.Enrollments) {
	t.Helper()
	tpmtest.Enrol(t, h.tpm, id, name, enr)
}

// produce makes evidence on h for nonce, checks that no key was created,
// and sends it through JSON as it would travel.
func produce(t *testing.T, h *host, id *identity.Identity, name string, nonce, log []byte) *attest.Evidence {
	t.Helper()
	m := vtpm.NewMeter(h.tpm, vtpm.ProfileNone)
	ev, err := identity.Produce(context.Background(), m, identity.ProduceOptions{
		HostID: name, Nonce: nonce, PCRs: identity.PCRsForPolicy(goodPolicy(t)), EventLog: log,
		Identity: id, Now: fixedClock(testNow.Add(-time.Second)),
	})
	if err != nil {
		t.Fatal(err)
	}
	st := m.Stats()
	if st.ByCode[tpm2.TPMCCCreatePrimary]+st.ByCode[tpm2.TPMCCCreate]+st.ByCode[tpm2.TPMCCCreateLoaded] != 0 {
		t.Errorf("evidence production created keys: %s", st)
	}
	t.Logf("produce (warm, cached identity): %d TPM commands (%s)", st.Total, st)
	raw, err := ev.Encode()
	if err != nil {
		t.Fatal(err)
	}
	out, err := attest.DecodeEvidence(raw)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func wantRule(t *testing.T, err error, rule attest.Rule, sentinel error) {
	t.Helper()
	var re *attest.RefusalError
	if !errors.As(err, &re) || re.Rule != rule || !errors.Is(err, sentinel) {
		t.Fatalf("Verify = %v, want a refusal by rule %s", err, rule)
	}
	t.Logf("refusal: %v", err)
}

// TestEvidenceRoundTrip runs the TPM side against the real verifier on
// emulated hosts that boot from real event logs.
func TestEvidenceRoundTrip(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	good, other := readFile(t, goodLog), readFile(t, otherLog)
	a := newHost(t, "host-a")
	a.boot(good)
	idA, err := identity.Provision(ctx, a.tpm, identity.ProvisionOptions{})
	if err != nil {
		t.Fatal(err)
	}
	enr := &attest.MemoryEnrollments{}
	enrol(t, a, idA, "host-a", enr)
	book := &attest.NonceBook{TTL: time.Minute, Clock: fixedClock(testNow), Rand: rand.Reader}
	verifier := func(roots *attest.RootStore) *attest.Verifier {
		return &attest.Verifier{Roots: roots, Policy: goodPolicy(t), Enrollments: enr, Nonces: book, Clock: fixedClock(testNow)}
	}
	v := verifier(a.roots(t))
	issue := func() []byte {
		n, err := book.Issue()
		if err != nil {
			t.Fatal(err)
		}
		return n
	}

	t.Run("accepted", func(t *testing.T) {
		nonce := issue()
		ev := produce(t, a, idA, "host-a", nonce, good)
		res, err := v.Verify(ctx, ev, nonce)
		if err != nil {
			t.Fatalf("%v\n%s", err, res.Explain())
		}
		t.Logf("\n%s", res.Explain())
		if !bytes.Equal(res.MKPublic, idA.MK.Public) || !bytes.Equal(res.AKName, idA.AK.Name) {
			t.Error("the verifier names another MK or AK")
		}
		// The result is what the source wraps for: the MK unwraps it.
		w, err := identity.Wrap(rand.Reader, res.MKPublic, []byte("0123456789abcdef0123456789abcdef"))
		if err != nil {
			t.Fatal(err)
		}
		got, err := identity.Unwrap(ctx, a.tpm, idA.MK, w, identity.UnwrapOptions{})
		if err != nil || string(got) != "0123456789abcdef0123456789abcdef" {
			t.Fatalf("unwrap after attestation: %q %v", got, err)
		}
		// The same evidence again: the nonce was consumed.
		_, err = v.Verify(ctx, ev, nonce)
		wantRule(t, err, attest.RuleNonce, attest.ErrStaleEvidence)
	})
	t.Run("P-384 EK", func(t *testing.T) {
		idECC, err := identity.LoadIdentity(ctx, a.tpm, identity.LoadOptions{EKKind: identity.EKECC})
		if err != nil {
			t.Fatal(err)
		}
		enrol(t, a, idECC, "host-a", enr)
		nonce := issue()
		if res, err := v.Verify(ctx, produce(t, a, idECC, "host-a", nonce, good), nonce); err != nil {
			t.Fatalf("%v\n%s", err, res.Explain())
		}
	})
	t.Run("three banks in one quote", func(t *testing.T) {
		nonce := issue()
		ev, err := identity.Produce(ctx, a.tpm, identity.ProduceOptions{
			HostID: "host-a", Nonce: nonce, EventLog: good, Identity: idA, Now: fixedClock(testNow),
			PCRs: map[attest.Bank][]int{"sha1": quoted, "sha256": quoted, "sha384": quoted},
		})
		if err != nil {
			t.Fatal(err)
		}
		if len(ev.PCRs) != 3 || len(ev.PCRs["sha384"]) != len(quoted) {
			t.Fatalf("PCR values: %d banks", len(ev.PCRs))
		}
		if res, err := v.Verify(ctx, ev, nonce); err != nil {
			t.Fatalf("%v\n%s", err, res.Explain())
		}
	})
	t.Run("enrolled EK without certificate", func(t *testing.T) {
		noCert := *idA
		noCert.EK.Cert = nil
		nonce := issue()
		res, err := verifier(attest.NewRootStore()).Verify(ctx, produce(t, a, &noCert, "host-a", nonce, good), nonce)
		if err != nil {
			t.Fatalf("%v\n%s", err, res.Explain())
		}
	})
	t.Run("answers an older nonce", func(t *testing.T) {
		old := issue()
		ev := produce(t, a, idA, "host-a", old, good)
		nonce := issue()
		_, err := v.Verify(ctx, ev, nonce)
		wantRule(t, err, attest.RuleNonce, attest.ErrStaleEvidence)
	})
	t.Run("event log of another boot", func(t *testing.T) {
		nonce := issue()
		_, err := v.Verify(ctx, produce(t, a, idA, "host-a", nonce, other), nonce)
		wantRule(t, err, attest.RuleEventLogReplay, attest.ErrEventLogReplay)
	})
	t.Run("EK certificate from another CA", func(t *testing.T) {
		b := newHost(t, "host-b")
		b.boot(good)
		idB, err := identity.Provision(ctx, b.tpm, identity.ProvisionOptions{})
		if err != nil {
			t.Fatal(err)
		}
		enrol(t, b, idB, "host-b", enr)
		nonce := issue()
		ev := produce(t, b, idB, "host-b", nonce, good)
		_, err = v.Verify(ctx, ev, nonce)
		wantRule(t, err, attest.RuleEKChain, attest.ErrEKUntrustedRoot)
		// Trusting host b's CA as well, the same kind of evidence passes.
		roots := a.roots(t)
		b.addRoots(t, roots)
		nonce = issue()
		if res, err := verifier(roots).Verify(ctx, produce(t, b, idB, "host-b", nonce, good), nonce); err != nil {
			t.Fatalf("%v\n%s", err, res.Explain())
		}
	})
	t.Run("tampered boot", func(t *testing.T) {
		a.boot(other) // same TPM and keys, another boot
		nonce := issue()
		_, err := v.Verify(ctx, produce(t, a, idA, "host-a", nonce, other), nonce)
		wantRule(t, err, attest.RulePCRPolicy, attest.ErrPCRPolicy)
	})
}

func TestProduceRefuses(t *testing.T) {
	t.Parallel()
	h := newHost(t, "refuse")
	ctx := context.Background()
	nonce := make([]byte, 32)
	if _, err := identity.Produce(ctx, h.tpm, identity.ProduceOptions{HostID: "h", Nonce: nonce, Now: time.Now}); !errors.Is(err, identity.ErrNotProvisioned) {
		t.Fatalf("Produce before Provision = %v, want ErrNotProvisioned", err)
	}
	id, err := identity.Provision(ctx, h.tpm, identity.ProvisionOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		opts identity.ProduceOptions
	}{
		{"short nonce", identity.ProduceOptions{Nonce: make([]byte, 8), Now: time.Now}},
		{"long nonce", identity.ProduceOptions{Nonce: make([]byte, 33), Now: time.Now}},
		{"no clock", identity.ProduceOptions{Nonce: nonce}},
		{"unknown bank", identity.ProduceOptions{Nonce: nonce, Now: time.Now, PCRs: map[attest.Bank][]int{"md5": {0}}}},
		{"PCR 24", identity.ProduceOptions{Nonce: nonce, Now: time.Now, PCRs: map[attest.Bank][]int{"sha256": {24}}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.opts.HostID, tc.opts.Identity = "h", id
			if _, err := identity.Produce(ctx, h.tpm, tc.opts); !errors.Is(err, identity.ErrBadOptions) {
				t.Fatalf("Produce = %v, want ErrBadOptions", err)
			}
		})
	}
}
