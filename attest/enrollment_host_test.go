package attest

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"
)

// TestVerifyEnrolledHost is issue 10's attack 5: a host relaying another
// enrolled host's evidence under its own name. The honest twin first: the
// evidence of host-b, asked of host-b, passes with rule enrolled-host in
// --explain. Then the same TPM's evidence renamed to host-x (the name is
// not under any signature), and host-b's evidence fetched when dialling
// host-x, are both refused by enrolled-host.
func TestVerifyEnrolledHost(t *testing.T) {
	ctx := context.Background()
	h := newFakeHost(t)
	v := h.verifier(t)
	nonce := testNonce(1)
	res, err := v.VerifyHost(ctx, "host-b", h.evidence(t, nonce), nonce)
	if err != nil {
		t.Fatalf("honest evidence refused: %v\n%s", err, res.Explain())
	}
	if !strings.Contains(res.Explain(), "PASS enrolled-host      AK enrolled for host host-b") {
		t.Fatalf("--explain lacks the enrolled-host step:\n%s", res.Explain())
	}
	// The relaying host (host-x) is enrolled too, with its own TPM.
	x := newFakeHost(t)
	xek, _ := ParsePublic("EK", x.ekPub)
	if err := v.Enrollments.Add(ctx, Enrollment{Host: "host-x", EKDigest: xek.Digest(), AKName: name(t, x.akPub)}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, dialled string
		rename        string
		want          string
	}{
		{"relayed under the relay's name", "host-x", "host-x", `enrolled for host "host-b", not for "host-x"`},
		{"relayed under the real name", "host-x", "", `the evidence names host "host-b", the verifier asked host "host-x"`},
	} {
		ev := h.evidence(t, nonce)
		if tc.rename != "" {
			ev.HostID = tc.rename
		}
		res, err := v.VerifyHost(ctx, tc.dialled, ev, nonce)
		var re *RefusalError
		if !errors.As(err, &re) || re.Rule != RuleEnrolledHost || !errors.Is(err, ErrWrongHost) || !strings.Contains(err.Error(), tc.want) {
			t.Fatalf("%s: got %v, want rule enrolled-host (%s)\n%s", tc.name, err, tc.want, res.Explain())
		}
		if !strings.Contains(res.Explain(), "FAIL enrolled-host") {
			t.Fatalf("%s: --explain lacks the failed step:\n%s", tc.name, res.Explain())
		}
	}
}

// TestEnrollmentOneTPMOneHost: a store refuses to enrol a TPM (its EK or
// its AK) already enrolled for another host, in memory and on file; the
// same host may be enrolled again (a new AK).
func TestEnrollmentOneTPMOneHost(t *testing.T) {
	ctx := context.Background()
	h := newFakeHost(t)
	ek, _ := ParsePublic("EK", h.ekPub)
	ak := name(t, h.akPub)
	for _, store := range []Enrollments{&MemoryEnrollments{}, &FileEnrollments{Path: filepath.Join(t.TempDir(), "e.json")}} {
		if err := store.Add(ctx, Enrollment{Host: "host-b", EKDigest: ek.Digest(), AKName: ak}); err != nil {
			t.Fatal(err)
		}
		if err := store.Add(ctx, Enrollment{Host: "host-b", EKDigest: ek.Digest(), AKName: []byte("a new AK")}); err != nil {
			t.Fatalf("%T: re-enrolling the same host: %v", store, err)
		}
		for _, e := range []Enrollment{
			{Host: "host-x", EKDigest: ek.Digest(), AKName: []byte("relayed")},
			{Host: "host-x", EKDigest: []byte("other EK"), AKName: ak},
			{EKDigest: []byte("no host"), AKName: []byte("no host")},
		} {
			var re *RefusalError
			if err := store.Add(ctx, e); !errors.As(err, &re) || re.Rule != RuleEnrolledHost {
				t.Fatalf("%T: Add(%+v) = %v, want rule enrolled-host", store, e, err)
			}
		}
		got, err := EnrolledHost(ctx, store, "host-b")
		if err != nil || got == nil || string(got.AKName) != "a new AK" {
			t.Fatalf("%T: EnrolledHost(host-b) = %+v, %v", store, got, err)
		}
		if got, err := EnrolledHost(ctx, store, "host-x"); err != nil || got != nil {
			t.Fatalf("%T: EnrolledHost(host-x) = %+v, %v", store, got, err)
		}
	}
}
