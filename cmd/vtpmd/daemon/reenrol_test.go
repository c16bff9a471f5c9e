package daemon

import (
	"context"
	"encoding/hex"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/migrate/registry/registrytest"
)

// TestEnrolmentsAfterReenrol: the verifier's enrolment store in registry
// mode (regEnrollments over the host's cached view) stops trusting a
// host's old TPM identity as soon as the registry's watch delivers its
// re-enrolment, although the cached view is not old enough to be read
// again by age (the clock stands still here): evidence from the old
// identity finds no enrolment (the verifier's rule ak-activation / enrolled-host
// refuses it), the new identity is the host's.
func TestEnrolmentsAfterReenrol(t *testing.T) {
	ctx := context.Background()
	c := registrytest.Start(t, registrytest.Options{})
	op := c.Open(t, "root")
	cfg := c.Config("host-a")
	cfg.NoFollow = false // vtpmd's client follows the registry
	hostA := c.OpenConfig(t, cfg)
	registrytest.Enroll(t, op, "host-a", "host-b")
	now := time.Now()
	r := regEnrollments{f: &fleetView{reg: hostA, now: func() time.Time { return now }}}
	oldID, newID := registrytest.Identity("host-b"), registrytest.Identity("host-b-new")
	find := func(id registry.Identity) bool {
		t.Helper()
		ek, _ := hex.DecodeString(id.EK)
		ak, _ := hex.DecodeString(id.AK)
		e, err := r.Find(ctx, ek, ak)
		if err != nil {
			t.Fatal(err)
		}
		return e != nil && e.Host == "host-b"
	}
	if !find(oldID) {
		t.Fatal("host-b's enrolled identity not found")
	}
	n0 := hostA.EnrolmentChanges()
	if err := op.SetState(ctx, "host-b", registry.StateFenced); err != nil {
		t.Fatal(err)
	}
	if _, err := op.Reenroll(ctx, registry.Enrolment{Host: "host-b", Identity: newID}); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); hostA.EnrolmentChanges() == n0; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the watch did not deliver the re-enrolment within 10 s")
		}
	}
	if find(oldID) {
		t.Fatal("host-b's replaced TPM identity is still trusted")
	}
	if !find(newID) {
		t.Fatal("host-b's new TPM identity not found")
	}
	e, err := r.FindHost(ctx, "host-b")
	if err != nil || e == nil || hex.EncodeToString(e.AKName) != newID.AK {
		t.Fatalf("host-b's enrolment: %+v, %v", e, err)
	}
}
