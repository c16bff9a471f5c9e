package migrate_test

import (
	"context"
	"crypto/rand"
	"slices"
	"testing"

	"github.com/vtpmm/vtpmm/attest"
)

// TestEvidenceCacheFollowsEnrolment: a destination's verified evidence is
// reused for EvidenceMaxAge only while the AK it was verified under is
// still the one enrolled for the host. Once the host's enrolment names
// another TPM (its TPM replaced and the host re-enrolled), the cached
// entry, made under the old identity, is not used: the next attestation
// asks the host for fresh evidence (and a migration would wrap keys for
// the new TPM's migration key, never the replaced one's).
func TestEvidenceCacheFollowsEnrolment(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFleet(t)
	a, b := f.addHost("host-a", goodLog), f.addHost("host-b", goodLog)
	evidence := func() int {
		return len(slices.DeleteFunc(b.wire.methods(), func(m string) bool { return m != "Evidence" }))
	}
	if err := a.node.Attest(ctx, "host-b"); err != nil {
		t.Fatal(err)
	}
	if err := a.node.Attest(ctx, "host-b"); err != nil {
		t.Fatal(err)
	}
	if n := evidence(); n != 1 {
		t.Fatalf("host-b was asked for evidence %d times, want 1 (the second attestation reuses it)", n)
	}
	// host-b's enrolment now names another TPM.
	rnd := func() attest.HexBytes {
		b := make([]byte, 32)
		_, _ = rand.Read(b)
		return b
	}
	if err := f.enr.Add(ctx, attest.Enrollment{Host: "host-b", EKDigest: rnd(), AKName: append([]byte{0, 0x0b}, rnd()...), Method: attest.MethodActivation}); err != nil {
		t.Fatal(err)
	}
	if err := a.node.Attest(ctx, "host-b"); err != nil {
		t.Fatal(err)
	}
	if n := evidence(); n != 2 {
		t.Fatalf("host-b was asked for evidence %d times after its enrolment changed, want 2: evidence verified under its replaced identity was reused", n)
	}
}
