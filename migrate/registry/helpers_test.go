package registry_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/migrate/registry/registrytest"
)

// fleet is a one-member cluster with the operator and hosts a, b, c
// enrolled, d draining, f fenced, and u not enrolled.
type fleet struct {
	c   *registrytest.Cluster
	op  *registry.Client
	a   *registry.Client
	b   *registry.Client
	ctx context.Context
}

func newFleet(t *testing.T) *fleet {
	t.Helper()
	c := registrytest.Start(t, registrytest.Options{})
	f := &fleet{c: c, ctx: context.Background()}
	f.op = c.Open(t, "root")
	registrytest.Enroll(t, f.op, "host-a", "host-b", "host-c", "host-d", "host-f")
	if err := f.op.SetState(f.ctx, "host-d", registry.StateDraining); err != nil {
		t.Fatal(err)
	}
	if err := f.op.SetState(f.ctx, "host-f", registry.StateFenced); err != nil {
		t.Fatal(err)
	}
	f.a = c.Open(t, "host-a")
	f.b = c.Open(t, "host-b")
	return f
}

// vm returns the VM's record (failing the test if absent).
func (f *fleet) vm(t *testing.T, id string) registry.VM {
	t.Helper()
	v, err := f.op.VMs(f.ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	vm, ok := v.VMs[id]
	if !ok {
		t.Fatalf("VM %s absent", id)
	}
	return vm
}

func batch(tx, from, to string, vms ...registry.VMGen) registry.Batch {
	return registry.Batch{TxID: tx, From: from, To: to, VMs: vms}
}

func gen(id string, g uint64) registry.VMGen { return registry.VMGen{ID: id, Generation: g} }

func mustErrIs(t *testing.T, err, want error) {
	t.Helper()
	if want == nil {
		if err != nil {
			t.Fatalf("unexpected error: %v", err)
		}
		return
	}
	if !errors.Is(err, want) {
		t.Fatalf("error %v, want %v", err, want)
	}
}

// waitEvent waits for a liveness event matching ok (a guard, not a timing
// assertion: it fails only if the event never comes).
func waitEvent(t *testing.T, ch <-chan registry.LivenessEvent, ok func(registry.LivenessEvent) bool) registry.LivenessEvent {
	t.Helper()
	guard := time.After(30 * time.Second)
	for {
		select {
		case e, open := <-ch:
			if !open {
				t.Fatal("watch closed")
			}
			if e.Err != nil {
				t.Fatal(e.Err)
			}
			if ok(e) {
				return e
			}
		case <-guard:
			t.Fatal("no matching liveness event within 30 s")
		}
	}
}

func errorsIs(err, target error) bool { return errors.Is(err, target) }

func withFromKey() []clientv3.OpOption { return []clientv3.OpOption{clientv3.WithFromKey()} }

// isPermissionDenied matches etcd's own error for calls made on the raw
// client (not through this package's classification).
func isPermissionDenied(err error) bool {
	return errors.Is(err, rpctypes.ErrPermissionDenied) || errors.Is(err, rpctypes.ErrGRPCPermissionDenied)
}

// regFleet is the fleet of newFleet seen through the Registry interface,
// so that the rule tables run against the real registry and the fake.
type regFleet struct {
	op, a, b registry.Registry
	open     func(t *testing.T, host string) registry.Registry
	ctx      context.Context
}

func (f *regFleet) vm(t *testing.T, id string) registry.VM {
	t.Helper()
	v, err := f.op.VMs(f.ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	vm, ok := v.VMs[id]
	if !ok {
		t.Fatalf("VM %s absent", id)
	}
	return vm
}

var impls = []struct {
	name  string
	fleet func(t *testing.T) *regFleet
}{
	{"etcd", func(t *testing.T) *regFleet {
		f := newFleet(t)
		return &regFleet{op: f.op, a: f.a, b: f.b, ctx: f.ctx,
			open: func(t *testing.T, h string) registry.Registry { return f.c.Open(t, h) }}
	}},
	{"fake", func(t *testing.T) *regFleet {
		fk := registrytest.NewFake()
		fk.RBAC = true
		f := &regFleet{op: fk.Client("root"), a: fk.Client("host-a"), b: fk.Client("host-b"), ctx: context.Background(),
			open: func(t *testing.T, h string) registry.Registry { return fk.Client(h) }}
		registrytest.Enroll(t, f.op, "host-a", "host-b", "host-c", "host-d", "host-f")
		if err := f.op.SetState(f.ctx, "host-d", registry.StateDraining); err != nil {
			t.Fatal(err)
		}
		if err := f.op.SetState(f.ctx, "host-f", registry.StateFenced); err != nil {
			t.Fatal(err)
		}
		return f
	}},
}
