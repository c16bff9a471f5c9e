package fake_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/migrate/evacuate"
	"github.com/vtpmm/vtpmm/migrate/evacuate/fake"
)

const vm = "00000000-0000-4000-8000-000000000001"

func setup() (*fake.Registry, *fake.Client, *fake.World) {
	g := fake.NewRegistry()
	for _, h := range []string{"a", "b"} {
		g.AddHost(evacuate.Host{Name: h, State: evacuate.HostActive, Live: true, Enrolled: true})
	}
	g.AddVM(vm, "a", 1)
	w := fake.NewWorld()
	w.AddHost("a", 8<<30)
	w.AddHost("b", 8<<30)
	w.AddVM(evacuate.VM{ID: vm, Memory: 1 << 30, Running: true}, "a", 1)
	return g, g.Connect(), w
}

// TestRegistryRules: claims and commits are compare-and-swaps, and no VM
// moves to a host that is not active.
func TestRegistryRules(t *testing.T) {
	ctx := context.Background()
	g, c, _ := setup()
	rec, _ := g.VM(vm)
	g.SetHost("b", evacuate.HostDraining, true)
	if _, err := c.Claim(ctx, evacuate.Claim{TxID: "t1", Source: "a", Dest: "b", Expect: map[string]int64{vm: rec.Revision}}); !errors.Is(err, evacuate.ErrHostNotActive) {
		t.Fatalf("claim to a draining host: %v", err)
	}
	g.SetHost("b", evacuate.HostActive, true)
	res, err := c.Claim(ctx, evacuate.Claim{TxID: "t1", Source: "a", Dest: "b", Expect: map[string]int64{vm: rec.Revision - 1}})
	if err != nil || res.OK || res.Records[vm].Revision != rec.Revision {
		t.Fatalf("claim on a stale revision: %+v, %v", res, err)
	}
	res, err = c.Claim(ctx, evacuate.Claim{TxID: "t1", Source: "a", Dest: "b", Expect: map[string]int64{vm: rec.Revision}})
	if err != nil || !res.OK || res.Records[vm].OpenTx != "t1" {
		t.Fatalf("claim: %+v, %v", res, err)
	}
	if res, _ := c.Claim(ctx, evacuate.Claim{TxID: "t2", Source: "a", Dest: "b", Expect: map[string]int64{vm: res.Records[vm].Revision}}); res.OK {
		t.Fatal("a claimed VM was claimed again")
	}
	for name, cm := range map[string]fake.Commit{
		"wrong generation": {TxID: "t1", Source: "a", Dest: "b", Moved: map[string]uint64{vm: 3}},
		"wrong owner":      {TxID: "t1", Source: "b", Dest: "a", Moved: map[string]uint64{vm: 2}},
		"another claim":    {TxID: "t9", Source: "a", Dest: "b", Moved: map[string]uint64{vm: 2}},
	} {
		if err := c.Commit(ctx, cm); !errors.Is(err, evacuate.ErrConflict) {
			t.Errorf("commit with %s: %v", name, err)
		}
	}
	if err := c.Commit(ctx, fake.Commit{TxID: "t1", Source: "a", Dest: "b", Moved: map[string]uint64{vm: 2}}); err != nil {
		t.Fatal(err)
	}
	if rec, _ := g.VM(vm); rec.Owner != "b" || rec.Generation != 2 || rec.OpenTx != "" {
		t.Fatalf("after commit: %+v", rec)
	}
	if err := c.Drain(ctx, "a"); err != nil || g.Host("a").State != evacuate.HostDraining {
		t.Fatalf("drain: %v", err)
	}
	g.SetHost("a", evacuate.HostFenced, false)
	if err := c.Drain(ctx, "a"); !errors.Is(err, evacuate.ErrSourceFenced) {
		t.Fatalf("drain a fenced host: %v", err)
	}
	c.Kill()
	if _, err := c.Hosts(ctx); !errors.Is(err, fake.ErrProcessDied) {
		t.Fatalf("a dead process's call: %v", err)
	}
	if alive, _ := g.Connect().SessionAlive(ctx, c.Session()); alive {
		t.Fatal("a dead process's session is alive")
	}
}

// TestRecordCAS: the evacuation record is written only over the revision read.
func TestRecordCAS(t *testing.T) {
	ctx := context.Background()
	_, c, _ := setup()
	rev, err := c.SaveEvacuation(ctx, "a", []byte("1"), 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.SaveEvacuation(ctx, "a", []byte("2"), 0); !errors.Is(err, evacuate.ErrConflict) {
		t.Fatalf("create over an existing record: %v", err)
	}
	if _, err := c.SaveEvacuation(ctx, "a", []byte("2"), rev); err != nil {
		t.Fatal(err)
	}
	if _, err := c.SaveEvacuation(ctx, "a", []byte("3"), rev); !errors.Is(err, evacuate.ErrConflict) {
		t.Fatalf("write over a stale revision: %v", err)
	}
}

// TestMoverNeedsKey: like libvirt, a migration to a host without the VM's
// key fails and the VM keeps running on the source.
func TestMoverNeedsKey(t *testing.T) {
	ctx := context.Background()
	g, c, w := setup()
	m := &fake.Mover{Source: "a", Registry: c, World: w, DropKey: map[string]bool{vm: true}}
	rec, _ := g.VM(vm)
	res, err := c.Claim(ctx, evacuate.Claim{TxID: "t1", Source: "a", Dest: "b", Expect: map[string]int64{vm: rec.Revision}})
	if err != nil || !res.OK {
		t.Fatal(err)
	}
	br, err := m.Move(ctx, evacuate.Batch{TxID: "t1", Source: "a", Dest: "b", VMs: []evacuate.BatchVM{{ID: vm, Memory: 1 << 30, Generation: 1}}},
		evacuate.NewSlots(1), func(evacuate.Progress) {})
	if err != nil {
		t.Fatal(err)
	}
	r := br.VMs[vm]
	if r.Outcome != evacuate.OutcomeFailed || r.RunsOn != "a" || w.Where(vm) != "a" {
		t.Fatalf("result %+v, runs on %s", r, w.Where(vm))
	}
	if rec, _ := g.VM(vm); rec.OpenTx != "" || rec.Owner != "a" {
		t.Fatalf("claim not released: %+v", rec)
	}
	if _, has := w.Key("b", vm); has || w.Pending() != 0 {
		t.Fatal("the destination kept a key")
	}
	if m.TransferKeys()[fake.Pair{Source: "a", Dest: "b"}] != 1 || m.Attestations()[fake.Pair{Source: "a", Dest: "b"}] != 1 {
		t.Fatalf("counts: %v %v", m.TransferKeys(), m.Attestations())
	}
	if !strings.Contains(r.Err, hypervisor.ErrSecretMissing.Error()) {
		t.Errorf("failure %q does not say the secret is missing", r.Err)
	}
}
