package registry_test

import (
	"testing"

	"github.com/vtpmm/vtpmm/migrate/registry"
)

// TestEvacuationRecord: a host writes its own evacuation record with
// compare-and-swap on its revision (0: only when there is none), reads it
// back, and its session (its liveness lease) is alive until it closes.
func TestEvacuationRecord(t *testing.T) {
	f := newFleet(t)
	_, _, err := f.a.LoadEvacuation(f.ctx, "host-a")
	mustErrIs(t, err, registry.ErrNotFound)
	rev, err := f.a.SaveEvacuation(f.ctx, "host-a", []byte(`{"v":1}`), 0)
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.a.SaveEvacuation(f.ctx, "host-a", []byte(`{"v":1,"again":true}`), 0)
	mustErrIs(t, err, registry.ErrConflict)
	b, got, err := f.a.LoadEvacuation(f.ctx, "host-a")
	if err != nil || got != rev || string(b) != `{"v":1}` {
		t.Fatalf("load: %q at %d %v (wrote %d)", b, got, err, rev)
	}
	rev2, err := f.a.SaveEvacuation(f.ctx, "host-a", []byte(`{"v":1,"n":2}`), rev)
	if err != nil || rev2 <= rev {
		t.Fatalf("save at %d: %d %v", rev, rev2, err)
	}
	_, err = f.a.SaveEvacuation(f.ctx, "host-a", []byte(`{}`), rev)
	mustErrIs(t, err, registry.ErrConflict)

	if f.a.Session() != "" {
		t.Fatalf("session %q before Register", f.a.Session())
	}
	if err := f.a.Register(f.ctx, hostRecord("host-a")); err != nil {
		t.Fatal(err)
	}
	s := f.a.Session()
	if alive, err := f.b.SessionAlive(f.ctx, s); err != nil || !alive {
		t.Fatalf("session %s of a registered host: alive %v %v", s, alive, err)
	}
	if err := f.a.Close(); err != nil {
		t.Fatal(err)
	}
	if alive, err := f.b.SessionAlive(f.ctx, s); err != nil || alive {
		t.Fatalf("session %s after Close: alive %v %v", s, alive, err)
	}
	_, err = f.b.SessionAlive(f.ctx, "not-a-lease")
	mustErrIs(t, err, registry.ErrBadRecord)
}
