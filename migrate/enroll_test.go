package migrate_test

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/attest"
	"github.com/vtpmm/vtpmm/migrate"
)

func TestEnroll(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	f := newFleet(t)
	a, b := f.addHost("host-a", goodLog), f.addHost("host-b", goodLog)
	store := &attest.MemoryEnrollments{}
	res, err := a.node.Enroll(ctx, "host-b", store)
	if err != nil {
		t.Fatalf("enroll host-b: %v", err)
	}
	t.Logf("enrolled: EK chain %s", res.EKChain)
	if !bytes.Equal(res.AKName, b.ident.AK.Name) {
		t.Fatalf("enrolled AK %x, host-b's AK is %x", res.AKName, b.ident.AK.Name)
	}
	if ok, err := store.Activated(ctx, res.EKDigest, res.AKName); err != nil || !ok {
		t.Fatalf("enrolment not recorded: %v %v", ok, err)
	}
	if a.audit.count("host-enrolled") != 1 {
		t.Fatal("enrolment not audited")
	}
	if m := b.wire.methods(); len(m) != 4 || m[0] != "Identity" || m[2] != "Activate" {
		t.Fatalf("host-b saw %v", m)
	}

	// A verifier that does not trust host-b's TPM CA refuses before any challenge.
	strict := migrate.NewNode(migrate.Config{
		Host: "host-a", Dial: f.dial("host-a"), Now: time.Now, Audit: a.audit,
		Verifier: &attest.Verifier{Roots: attest.NewRootStore(), Policy: f.policy, Enrollments: store, Clock: time.Now},
	})
	_, err = strict.Enroll(ctx, "host-b", &attest.MemoryEnrollments{})
	var re *attest.RefusalError
	if !errors.Is(err, migrate.ErrRefused) || !errors.As(err, &re) || re.Rule != attest.RuleEKChain {
		t.Fatalf("enroll with an untrusted EK CA: %v, want ErrRefused by rule ek-chain", err)
	}
	t.Logf("refused: %v", err)
}
