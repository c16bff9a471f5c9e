package registry_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"

	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/migrate/registry/registrytest"
)

// TestReenrollRules: a retired (fenced) host's enrolment is replaced by a
// new TPM identity and the host is active again; the replaced identity is
// kept on record and never accepted again; every refusal names its rule
// and changes nothing. The same table runs on real etcd and on the fake.
func TestReenrollRules(t *testing.T) {
	for _, impl := range impls {
		t.Run(impl.name, func(t *testing.T) { testReenrollRules(t, impl.fleet(t)) })
	}
}

func hostView(t *testing.T, f *regFleet, host string) registry.HostView {
	t.Helper()
	v, err := f.op.Hosts(f.ctx, host)
	if err != nil {
		t.Fatal(err)
	}
	return v.Hosts[host]
}

func testReenrollRules(t *testing.T, f *regFleet) {
	id := registrytest.Identity
	enrol := func(host string, ident registry.Identity) registry.Enrolment {
		return registry.Enrolment{Host: host, Identity: ident}
	}
	unchanged := func(t *testing.T, host string, want registry.Identity, state registry.HostState) {
		t.Helper()
		h := hostView(t, f, host)
		if h.Enrolment == nil || h.Enrolment.Identity != want || h.State != state {
			t.Fatalf("%s changed: %+v state %s", host, h.Enrolment, h.State)
		}
	}
	refusals := []struct {
		name, host string
		ident      registry.Identity
		want       error
		rule       string
	}{
		{"active host", "host-a", id("host-a2"), registry.ErrNotRetired, "rule reenroll-needs-retired"},
		{"draining host", "host-d", id("host-d2"), registry.ErrNotRetired, "rule reenroll-needs-retired"},
		{"not enrolled", "host-u", id("host-u2"), registry.ErrNotEnrolled, "rule enrolled"},
		{"same identity", "host-f", id("host-f"), registry.ErrSameIdentity, "rule reenroll-new-identity"},
		{"old EK, new AK", "host-f", registry.Identity{EK: id("host-f").EK, AK: id("host-f2").AK}, registry.ErrIdentityRetired, "rule identity-retired"},
		{"new EK, old AK", "host-f", registry.Identity{EK: id("host-f2").EK, AK: id("host-f").AK}, registry.ErrIdentityRetired, "rule identity-retired"},
	}
	for _, tc := range refusals {
		_, err := f.op.Reenroll(f.ctx, enrol(tc.host, tc.ident))
		mustErrIs(t, err, tc.want)
		if !strings.Contains(err.Error(), tc.rule) {
			t.Errorf("%s: %v does not name %s", tc.name, err, tc.rule)
		}
	}
	unchanged(t, "host-a", id("host-a"), registry.StateActive)
	unchanged(t, "host-d", id("host-d"), registry.StateDraining)
	unchanged(t, "host-f", id("host-f"), registry.StateFenced)

	// The re-enrolment: new identity, active, the old one on record.
	rec, err := f.op.Reenroll(f.ctx, enrol("host-f", id("host-f2")))
	if err != nil {
		t.Fatal(err)
	}
	h := hostView(t, f, "host-f")
	if h.State != registry.StateActive || h.Enrolment == nil || h.Enrolment.Identity != id("host-f2") {
		t.Fatalf("after re-enrolment: %+v state %s", h.Enrolment, h.State)
	}
	if len(h.Enrolment.Replaced) != 1 || h.Enrolment.Replaced[0].Identity != id("host-f") || h.Enrolment.Replaced[0].Replaced.IsZero() ||
		h.Enrolment.Replaced[0].By != "root" || len(rec.Replaced) != 1 || rec.Identity != id("host-f2") {
		t.Fatalf("replaced identities: %+v (returned %+v)", h.Enrolment.Replaced, rec.Replaced)
	}
	// It may own VMs again; the first enrolment's rule still holds.
	if _, err := f.op.CreateVM(f.ctx, "vm-reenrolled", "host-f"); err != nil {
		t.Fatal(err)
	}
	mustErrIs(t, f.op.Enroll(f.ctx, enrol("host-f", id("host-f"))), registry.ErrExists)
	if err := f.op.Enroll(f.ctx, enrol("host-f", id("host-f2"))); err != nil {
		t.Fatalf("enrolling the current identity again: %v", err)
	}
	// Active again: a second re-enrolment needs another retirement.
	_, err = f.op.Reenroll(f.ctx, enrol("host-f", id("host-f3")))
	mustErrIs(t, err, registry.ErrNotRetired)

	// Retired again: neither earlier identity comes back; a third does.
	if err := f.op.SetState(f.ctx, "host-f", registry.StateFenced); err != nil {
		t.Fatal(err)
	}
	for _, old := range []registry.Identity{id("host-f"), id("host-f2")} {
		_, err := f.op.Reenroll(f.ctx, enrol("host-f", old))
		if !errors.Is(err, registry.ErrIdentityRetired) && !errors.Is(err, registry.ErrSameIdentity) {
			t.Fatalf("old identity %s…: %v", old.EK[:8], err)
		}
	}
	_, err = f.op.Reenroll(f.ctx, enrol("host-f", id("host-f")))
	mustErrIs(t, err, registry.ErrIdentityRetired)
	if _, err := f.op.Reenroll(f.ctx, enrol("host-f", id("host-f3"))); err != nil {
		t.Fatal(err)
	}
	h = hostView(t, f, "host-f")
	if len(h.Enrolment.Replaced) != 2 || h.Enrolment.Replaced[0].Identity != id("host-f") || h.Enrolment.Replaced[1].Identity != id("host-f2") {
		t.Fatalf("replaced identities: %+v", h.Enrolment.Replaced)
	}
}

// TestReenrollFake: the fake's refusals for RBAC (a host may not re-enrol
// one: enrolments are the operator's) and no quorum.
func TestReenrollFake(t *testing.T) {
	fk := registrytest.NewFake()
	fk.RBAC = true
	op := fk.Client("root")
	registrytest.Enroll(t, op, "host-f")
	ctx := context.Background()
	if err := op.SetState(ctx, "host-f", registry.StateFenced); err != nil {
		t.Fatal(err)
	}
	_, err := fk.Client("host-a").Reenroll(ctx, registry.Enrolment{Host: "host-f", Identity: registrytest.Identity("host-f2")})
	mustErrIs(t, err, registry.ErrPermission)
	fk.Fail = func(op, host string) error {
		if op == "reenrol" {
			return registry.ErrNoQuorum
		}
		return nil
	}
	_, err = op.Reenroll(ctx, registry.Enrolment{Host: "host-f", Identity: registrytest.Identity("host-f2")})
	mustErrIs(t, err, registry.ErrNoQuorum)
}

// TestReenrollCAS: two operators re-enrolling the same retired host with
// different new TPMs at once: exactly one wins (the compare-and-swap on
// the enrolment's and state's revisions), the record holds the winner's
// identity with the old one replaced once, and the loser changed nothing.
func TestReenrollCAS(t *testing.T) {
	f := newFleet(t)
	op2 := f.c.Open(t, "root")
	prev := registrytest.Identity("host-f")
	for round := 0; round < 10; round++ {
		if err := f.op.SetState(f.ctx, "host-f", registry.StateFenced); err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		errs := make([]error, 2)
		ids := []registry.Identity{registrytest.Identity(fmt.Sprintf("x%d-1", round)), registrytest.Identity(fmt.Sprintf("x%d-2", round))}
		for i, c := range []*registry.Client{f.op, op2} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, errs[i] = c.Reenroll(f.ctx, registry.Enrolment{Host: "host-f", Identity: ids[i]})
			}()
		}
		wg.Wait()
		won := -1
		for i, err := range errs {
			switch {
			case err == nil:
				if won >= 0 {
					t.Fatalf("round %d: both re-enrolments succeeded", round)
				}
				won = i
			case errors.Is(err, registry.ErrConflict), errors.Is(err, registry.ErrNotRetired):
			default:
				t.Fatalf("round %d: %v", round, err)
			}
		}
		if won < 0 {
			t.Fatalf("round %d: neither succeeded: %v", round, errs)
		}
		v, err := f.op.Hosts(f.ctx, "host-f")
		if err != nil {
			t.Fatal(err)
		}
		e := v.Hosts["host-f"].Enrolment
		if e.Identity != ids[won] || len(e.Replaced) != round+1 || e.Replaced[round].Identity != prev || v.Hosts["host-f"].State != registry.StateActive {
			t.Fatalf("round %d: %+v", round, e)
		}
		prev = ids[won]
	}
}

// TestReenrollNoQuorum: without quorum the re-enrolment fails closed.
func TestReenrollNoQuorum(t *testing.T) {
	f := newFleet(t)
	f.c.StopMember("member-1")
	_, err := f.op.Reenroll(f.ctx, registry.Enrolment{Host: "host-f", Identity: registrytest.Identity("host-f2")})
	mustErrIs(t, err, registry.ErrNoQuorum)
}

// TestRestoreOntoOwner: a restore onto the VM's own owner (its TPM was
// replaced and it was re-enrolled) opens a transaction from the owner to
// itself and commits it at the next generation, which fences every copy
// of the old TPM; without a transaction (a commit without Begin) a batch
// from a host to itself stays refused. Real etcd and the fake.
func TestRestoreOntoOwner(t *testing.T) {
	for _, impl := range impls {
		t.Run(impl.name, func(t *testing.T) {
			f := impl.fleet(t)
			if _, err := f.op.CreateVM(f.ctx, "vm-self", "host-a"); err != nil {
				t.Fatal(err)
			}
			_, err := f.op.Commit(f.ctx, batch("", "host-a", "host-a", gen("vm-self", 1)))
			mustErrIs(t, err, registry.ErrBadRecord)
			b := batch("restore-1", "host-a", "host-a", gen("vm-self", 1))
			if _, err := f.op.Begin(f.ctx, b); err != nil {
				t.Fatal(err)
			}
			if vm := f.vm(t, "vm-self"); vm.Owner != "host-a" || vm.Generation != 1 || vm.Tx == nil || vm.Tx.To != "host-a" {
				t.Fatalf("after Begin: %+v", vm)
			}
			if _, err := f.op.Commit(f.ctx, b); err != nil {
				t.Fatal(err)
			}
			if vm := f.vm(t, "vm-self"); vm.Owner != "host-a" || vm.Generation != 2 || vm.Tx != nil {
				t.Fatalf("after Commit: %+v", vm)
			}
		})
	}
}
