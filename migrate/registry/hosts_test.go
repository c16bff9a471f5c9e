package registry_test

import (
	"context"
	"testing"

	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/migrate/registry/registrytest"
)

func hostRecord(name string) registry.Host {
	return registry.Host{Name: name, Addr: name + ":7443", Identity: registrytest.Identity(name)}
}

// TestHostsView: registration, enrolment and state come back in one read;
// enrolment is written once; a fenced host stays fenced when it registers.
func TestHostsView(t *testing.T) {
	f := newFleet(t)
	if err := f.a.Register(f.ctx, hostRecord("host-a")); err != nil {
		t.Fatal(err)
	}
	if err := f.a.Register(f.ctx, hostRecord("host-b")); !errorsIs(err, registry.ErrConfig) {
		t.Fatalf("host-a registered host-b: %v", err)
	}
	n0 := f.b.RoundTrips()
	v, err := f.b.Hosts(f.ctx)
	if err != nil {
		t.Fatal(err)
	}
	if n := f.b.RoundTrips() - n0; n != 1 {
		t.Fatalf("Hosts took %d round trips, want 1", n)
	}
	a := v.Hosts["host-a"]
	if a.Host == nil || a.Host.Addr != "host-a:7443" || !a.Live || a.State != registry.StateActive || a.Enrolment == nil || a.Enrolment.Identity != registrytest.Identity("host-a") || a.Enrolment.By != "root" {
		t.Fatalf("host-a: %+v", a)
	}
	if b := v.Hosts["host-b"]; b.Host != nil || b.Live || b.State != registry.StateActive {
		t.Fatalf("host-b (enrolled, never registered): %+v", b)
	}
	if d := v.Hosts["host-d"]; d.State != registry.StateDraining {
		t.Fatalf("host-d: %+v", d)
	}
	if _, ok := v.Hosts["host-u"]; ok {
		t.Fatal("unknown host listed")
	}
	one, err := f.b.Hosts(f.ctx, "host-a", "host-u")
	if err != nil {
		t.Fatal(err)
	}
	if len(one.Hosts) != 1 || !one.Hosts["host-a"].Live {
		t.Fatalf("named read: %+v", one.Hosts)
	}

	// Enrolment: the same identity again is a no-op; another is refused.
	if err := f.op.Enroll(f.ctx, registry.Enrolment{Host: "host-a", Identity: registrytest.Identity("host-a")}); err != nil {
		t.Fatal(err)
	}
	err = f.op.Enroll(f.ctx, registry.Enrolment{Host: "host-a", Identity: registrytest.Identity("host-z")})
	mustErrIs(t, err, registry.ErrExists)
	mustErrIs(t, f.op.SetState(f.ctx, "host-u", registry.StateDraining), registry.ErrNotEnrolled)

	// A fenced host that registers (again) stays fenced.
	fc := f.c.Open(t, "host-f")
	if err := fc.Register(f.ctx, hostRecord("host-f")); err != nil {
		t.Fatal(err)
	}
	if err := f.op.Enroll(f.ctx, registry.Enrolment{Host: "host-f", Identity: registrytest.Identity("host-f")}); err != nil {
		t.Fatal(err)
	}
	v, err = f.b.Hosts(f.ctx, "host-f")
	if err != nil {
		t.Fatal(err)
	}
	if s := v.Hosts["host-f"].State; s != registry.StateFenced {
		t.Fatalf("host-f is %s", s)
	}
}

// TestLeaseExpiry: a host that dies without closing stays live until its
// lease expires, then is reported not live by the watch; a standby can
// then take its VMs over (Bump with OwnerNotLive), and not before.
func TestLeaseExpiry(t *testing.T) {
	f := newFleet(t)
	ctx, cancel := context.WithCancel(f.ctx)
	defer cancel()
	hv, err := f.b.Hosts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	watch := f.b.WatchLiveness(ctx, hv.Rev+1)
	dying := f.c.Open(t, "host-c")
	if err := dying.Register(ctx, hostRecord("host-c")); err != nil {
		t.Fatal(err)
	}
	waitEvent(t, watch, func(e registry.LivenessEvent) bool { return e.Host == "host-c" && e.Live })
	if !dying.Live() {
		t.Fatal("registered host does not know it is live")
	}
	vm, err := f.op.CreateVM(ctx, "vm-lease", "host-c")
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.b.Bump(ctx, registry.Bump{VM: "vm-lease", Expect: &vm, Owner: "host-b", Generation: 2, OwnerNotLive: true})
	mustErrIs(t, err, registry.ErrHostLive)

	dying.CrashForTest()
	e := waitEvent(t, watch, func(e registry.LivenessEvent) bool { return e.Host == "host-c" })
	if e.Live {
		t.Fatalf("event %+v", e)
	}
	v, err := f.b.Hosts(ctx, "host-c")
	if err != nil {
		t.Fatal(err)
	}
	if h := v.Hosts["host-c"]; h.Live || h.Host == nil {
		t.Fatalf("after expiry: %+v", h)
	}
	got, err := f.b.Bump(ctx, registry.Bump{VM: "vm-lease", Expect: &vm, Owner: "host-b", Generation: 2, OwnerNotLive: true})
	if err != nil {
		t.Fatal(err)
	}
	if got.Owner != "host-b" || got.Generation != 2 {
		t.Fatalf("after takeover: %+v", got)
	}
}

// TestCloseRevokes: a clean Close makes the host not live at once.
func TestCloseRevokes(t *testing.T) {
	f := newFleet(t)
	c, err := registry.OpenClient(f.ctx, f.c.Config("host-c"))
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Register(f.ctx, hostRecord("host-c")); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	v, err := f.b.Hosts(f.ctx, "host-c")
	if err != nil {
		t.Fatal(err)
	}
	if v.Hosts["host-c"].Live {
		t.Fatal("closed host still live")
	}
	_, err = c.VMs(f.ctx)
	mustErrIs(t, err, registry.ErrClosed)
}

// TestRecords: standby records and evacuation plans.
func TestRecords(t *testing.T) {
	f := newFleet(t)
	for _, h := range []string{"host-b", "host-c"} {
		if err := f.b.PutStandby(f.ctx, registry.Standby{VM: "vm-s", Host: h, Generation: 3}); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.b.PutStandby(f.ctx, registry.Standby{VM: "vm-s2", Host: "host-b", Generation: 1}); err != nil {
		t.Fatal(err)
	}
	ss, err := f.a.Standbys(f.ctx, "vm-s")
	if err != nil {
		t.Fatal(err)
	}
	if len(ss) != 2 || ss[0].Host != "host-b" || ss[1].Host != "host-c" || ss[0].Generation != 3 {
		t.Fatalf("standbys %+v", ss)
	}
	if err := f.a.DropStandby(f.ctx, "vm-s", "host-c"); err != nil {
		t.Fatal(err)
	}
	if ss, _ := f.a.Standbys(f.ctx, "vm-s"); len(ss) != 1 {
		t.Fatalf("after drop: %+v", ss)
	}

	_, _, err = f.op.Plan(f.ctx, "host-a")
	mustErrIs(t, err, registry.ErrNotFound)
	p := registry.Plan{Source: "host-a", State: "planned", Items: []registry.PlanItem{{VM: "vm-1", Dest: "host-b", State: "planned"}}}
	rev, err := f.op.PutPlan(f.ctx, p, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.op.PutPlan(f.ctx, p, 0) // a second run starting over
	mustErrIs(t, err, registry.ErrConflict)
	got, grev, err := f.op.Plan(f.ctx, "host-a")
	if err != nil {
		t.Fatal(err)
	}
	if grev != rev || got.Items[0].Dest != "host-b" || got.Created.IsZero() {
		t.Fatalf("plan %+v at %d (wrote %d)", got, grev, rev)
	}
	got.Items[0].State, got.Items[0].Generation = "moved", 2
	rev2, err := f.op.PutPlan(f.ctx, got, grev)
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.op.PutPlan(f.ctx, got, grev)
	mustErrIs(t, err, registry.ErrConflict)
	mustErrIs(t, f.op.DeletePlan(f.ctx, "host-a", grev), registry.ErrConflict)
	if err := f.op.DeletePlan(f.ctx, "host-a", rev2); err != nil {
		t.Fatal(err)
	}
}
