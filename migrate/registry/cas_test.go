package registry_test

import (
	"fmt"
	"sync"
	"testing"

	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/migrate/registry/registrytest"
)

// TestCASRules: every ownership change is a compare-and-swap on the VM's
// exact record (owner, generation, open transaction) and on the
// destination's enrolment and state; a refusal names the rule and changes
// nothing.
func TestCASRules(t *testing.T) {
	for _, impl := range impls {
		t.Run(impl.name, func(t *testing.T) { testCASRules(t, impl.fleet(t)) })
	}
}

func testCASRules(t *testing.T, f *regFleet) {
	max := registry.MaxGeneration
	type want struct {
		owner string
		gen   uint64
		tx    string
	}
	tests := []struct {
		name  string
		setup func(t *testing.T, id string) // the VM starts at host-a, generation 1
		act   func(id string) error
		err   error
		want  *want // the record afterwards (nil: absent)
	}{
		{name: "begin", act: func(id string) error {
			_, err := f.a.Begin(f.ctx, batch("tx1", "host-a", "host-b", gen(id, 1)))
			return err
		}, want: &want{"host-a", 1, "tx1"}},
		{name: "begin wrong owner", act: func(id string) error {
			_, err := f.b.Begin(f.ctx, batch("tx1", "host-b", "host-c", gen(id, 1)))
			return err
		}, err: registry.ErrWrongOwner, want: &want{"host-a", 1, ""}},
		{name: "begin stale generation", act: func(id string) error {
			_, err := f.a.Begin(f.ctx, batch("tx1", "host-a", "host-b", gen(id, 2)))
			return err
		}, err: registry.ErrStaleGeneration, want: &want{"host-a", 1, ""}},
		{name: "begin VM absent", setup: func(t *testing.T, id string) {}, act: func(id string) error {
			_, err := f.a.Begin(f.ctx, batch("tx1", "host-a", "host-b", gen(id+"-x", 1)))
			return err
		}, err: registry.ErrNotFound},
		{name: "begin to fenced host", act: func(id string) error {
			_, err := f.a.Begin(f.ctx, batch("tx1", "host-a", "host-f", gen(id, 1)))
			return err
		}, err: registry.ErrHostFenced, want: &want{"host-a", 1, ""}},
		{name: "begin to draining host", act: func(id string) error {
			_, err := f.a.Begin(f.ctx, batch("tx1", "host-a", "host-d", gen(id, 1)))
			return err
		}, err: registry.ErrHostNotActive, want: &want{"host-a", 1, ""}},
		{name: "begin to unenrolled host", act: func(id string) error {
			_, err := f.a.Begin(f.ctx, batch("tx1", "host-a", "host-u", gen(id, 1)))
			return err
		}, err: registry.ErrNotEnrolled, want: &want{"host-a", 1, ""}},
		{name: "begin while another transaction is open", setup: func(t *testing.T, id string) {
			createVM(t, f, id)
			if _, err := f.a.Begin(f.ctx, batch("tx0", "host-a", "host-c", gen(id, 1))); err != nil {
				t.Fatal(err)
			}
		}, act: func(id string) error {
			_, err := f.a.Begin(f.ctx, batch("tx1", "host-a", "host-b", gen(id, 1)))
			return err
		}, err: registry.ErrBusy, want: &want{"host-a", 1, "tx0"}},
		{name: "begin at the generation bound", setup: func(t *testing.T, id string) {
			bump(t, f, id, max)
		}, act: func(id string) error {
			_, err := f.a.Begin(f.ctx, batch("tx1", "host-a", "host-b", gen(id, max)))
			return err
		}, err: registry.ErrGenerationBounds, want: &want{"host-a", max, ""}},
		{name: "begin generation zero", act: func(id string) error {
			_, err := f.a.Begin(f.ctx, batch("tx1", "host-a", "host-b", gen(id, 0)))
			return err
		}, err: registry.ErrGenerationBounds, want: &want{"host-a", 1, ""}},
		{name: "begin generation 2^64-1", act: func(id string) error {
			_, err := f.a.Begin(f.ctx, batch("tx1", "host-a", "host-b", gen(id, ^uint64(0))))
			return err
		}, err: registry.ErrGenerationBounds, want: &want{"host-a", 1, ""}},
		{name: "commit after begin", setup: begun(f, "tx1", "host-b"), act: func(id string) error {
			_, err := f.a.Commit(f.ctx, batch("tx1", "host-a", "host-b", gen(id, 1)))
			return err
		}, want: &want{"host-b", 2, ""}},
		{name: "commit repeated (outcome was unknown)", setup: func(t *testing.T, id string) {
			begun(f, "tx1", "host-b")(t, id)
			if _, err := f.a.Commit(f.ctx, batch("tx1", "host-a", "host-b", gen(id, 1))); err != nil {
				t.Fatal(err)
			}
		}, act: func(id string) error {
			_, err := f.a.Commit(f.ctx, batch("tx1", "host-a", "host-b", gen(id, 1)))
			return err
		}, want: &want{"host-b", 2, ""}},
		{name: "commit retried after the destination was fenced", setup: func(t *testing.T, id string) {
			if _, err := f.op.CreateVM(f.ctx, id, "host-a"); err != nil {
				t.Fatal(err)
			}
			to := "host-h"
			if err := f.op.Enroll(f.ctx, registry.Enrolment{Host: to, Identity: registry.Identity{EK: "00", AK: "00"}}); err != nil {
				t.Fatal(err)
			}
			if _, err := f.a.Commit(f.ctx, batch("", "host-a", to, gen(id, 1))); err != nil {
				t.Fatal(err)
			}
			if err := f.op.SetState(f.ctx, to, registry.StateFenced); err != nil {
				t.Fatal(err)
			}
		}, act: func(id string) error {
			// It took effect before the fence: the retry reports so.
			_, err := f.a.Commit(f.ctx, batch("", "host-a", "host-h", gen(id, 1)))
			return err
		}, want: &want{"host-h", 2, ""}},
		{name: "commit of another transaction", setup: begun(f, "tx1", "host-b"), act: func(id string) error {
			_, err := f.a.Commit(f.ctx, batch("tx2", "host-a", "host-b", gen(id, 1)))
			return err
		}, err: registry.ErrBusy, want: &want{"host-a", 1, "tx1"}},
		{name: "commit without begin while a transaction is open", setup: begun(f, "tx1", "host-b"), act: func(id string) error {
			_, err := f.a.Commit(f.ctx, batch("", "host-a", "host-b", gen(id, 1)))
			return err
		}, err: registry.ErrBusy, want: &want{"host-a", 1, "tx1"}},
		{name: "commit without begin", act: func(id string) error {
			_, err := f.a.Commit(f.ctx, batch("", "host-a", "host-b", gen(id, 1)))
			return err
		}, want: &want{"host-b", 2, ""}},
		{name: "commit stale generation", act: func(id string) error {
			_, err := f.a.Commit(f.ctx, batch("", "host-a", "host-b", gen(id, 3)))
			return err
		}, err: registry.ErrStaleGeneration, want: &want{"host-a", 1, ""}},
		{name: "commit by a former owner", setup: func(t *testing.T, id string) {
			createVM(t, f, id)
			if _, err := f.a.Commit(f.ctx, batch("", "host-a", "host-b", gen(id, 1))); err != nil {
				t.Fatal(err)
			}
		}, act: func(id string) error {
			_, err := f.a.Commit(f.ctx, batch("", "host-a", "host-c", gen(id, 1)))
			return err
		}, err: registry.ErrWrongOwner, want: &want{"host-b", 2, ""}},
		{name: "commit to a host fenced after begin", setup: func(t *testing.T, id string) {
			if _, err := f.op.CreateVM(f.ctx, id, "host-a"); err != nil {
				t.Fatal(err)
			}
			if err := f.op.Enroll(f.ctx, registry.Enrolment{Host: "host-g" + id[len(id)-2:], Identity: registry.Identity{EK: "00", AK: "00"}}); err != nil {
				t.Fatal(err)
			}
			to := "host-g" + id[len(id)-2:]
			if _, err := f.a.Begin(f.ctx, batch("tx1", "host-a", to, gen(id, 1))); err != nil {
				t.Fatal(err)
			}
			if err := f.op.SetState(f.ctx, to, registry.StateFenced); err != nil {
				t.Fatal(err)
			}
		}, act: func(id string) error {
			_, err := f.a.Commit(f.ctx, batch("tx1", "host-a", "host-g"+id[len(id)-2:], gen(id, 1)))
			return err
		}, err: registry.ErrHostFenced, want: &want{"host-a", 1, "tx1"}},
		{name: "commit to draining host (begun before the drain)", setup: func(t *testing.T, id string) {
			begun(f, "tx1", "host-c")(t, id)
			if err := f.op.SetState(f.ctx, "host-c", registry.StateDraining); err != nil {
				t.Fatal(err)
			}
		}, act: func(id string) error {
			// A drain stops new migrations, not one whose VM already moved.
			_, err := f.a.Commit(f.ctx, batch("tx1", "host-a", "host-c", gen(id, 1)))
			if err2 := f.op.SetState(f.ctx, "host-c", registry.StateActive); err2 != nil {
				return err2
			}
			return err
		}, want: &want{"host-c", 2, ""}},
		{name: "abort", setup: begun(f, "tx1", "host-b"), act: func(id string) error {
			_, err := f.a.Abort(f.ctx, batch("tx1", "host-a", "host-b", gen(id, 1)))
			return err
		}, want: &want{"host-a", 1, ""}},
		{name: "abort repeated", setup: func(t *testing.T, id string) {
			begun(f, "tx1", "host-b")(t, id)
			if _, err := f.a.Abort(f.ctx, batch("tx1", "host-a", "host-b", gen(id, 1))); err != nil {
				t.Fatal(err)
			}
		}, act: func(id string) error {
			_, err := f.a.Abort(f.ctx, batch("tx1", "host-a", "host-b", gen(id, 1)))
			return err
		}, want: &want{"host-a", 1, ""}},
		{name: "abort of another transaction", setup: begun(f, "tx1", "host-b"), act: func(id string) error {
			_, err := f.a.Abort(f.ctx, batch("tx9", "host-a", "host-b", gen(id, 1)))
			return err
		}, err: registry.ErrBusy, want: &want{"host-a", 1, "tx1"}},
		{name: "batch with one bad VM changes none", act: func(id string) error {
			if _, err := f.op.CreateVM(f.ctx, id+"-2", "host-a"); err != nil {
				return err
			}
			_, err := f.a.Commit(f.ctx, batch("", "host-a", "host-b", gen(id+"-2", 1), gen(id, 5)))
			if v := f.vm(t, id+"-2"); v.Owner != "host-a" || v.Generation != 1 {
				return fmt.Errorf("the good VM moved: %+v", v)
			}
			return err
		}, err: registry.ErrStaleGeneration, want: &want{"host-a", 1, ""}},
		{name: "create twice", act: func(id string) error {
			_, err := f.b.CreateVM(f.ctx, id, "host-b")
			return err
		}, err: registry.ErrExists, want: &want{"host-a", 1, ""}},
		{name: "create owned by fenced host", setup: func(t *testing.T, id string) {}, act: func(id string) error {
			_, err := f.op.CreateVM(f.ctx, id, "host-f")
			return err
		}, err: registry.ErrHostFenced},
		{name: "create owned by unenrolled host", setup: func(t *testing.T, id string) {}, act: func(id string) error {
			_, err := f.op.CreateVM(f.ctx, id, "host-u")
			return err
		}, err: registry.ErrNotEnrolled},
		{name: "bump (restore)", act: func(id string) error {
			cur := f.vm(t, id)
			_, err := f.b.Bump(f.ctx, registry.Bump{VM: id, Expect: &cur, Owner: "host-b", Generation: 7})
			return err
		}, want: &want{"host-b", 7, ""}},
		{name: "bump over an open transaction", setup: begun(f, "tx1", "host-c"), act: func(id string) error {
			cur := f.vm(t, id)
			_, err := f.b.Bump(f.ctx, registry.Bump{VM: id, Expect: &cur, Owner: "host-b", Generation: 2})
			return err
		}, want: &want{"host-b", 2, ""}},
		{name: "bump of an absent VM (restore onto an older registry)", setup: func(t *testing.T, id string) {}, act: func(id string) error {
			_, err := f.b.Bump(f.ctx, registry.Bump{VM: id, Owner: "host-b", Generation: 12})
			return err
		}, want: &want{"host-b", 12, ""}},
		{name: "bump expecting absent, VM present", act: func(id string) error {
			_, err := f.b.Bump(f.ctx, registry.Bump{VM: id, Owner: "host-b", Generation: 12})
			return err
		}, err: registry.ErrExists, want: &want{"host-a", 1, ""}},
		{name: "bump that does not raise", act: func(id string) error {
			cur := f.vm(t, id)
			_, err := f.b.Bump(f.ctx, registry.Bump{VM: id, Expect: &cur, Owner: "host-b", Generation: 1})
			return err
		}, err: registry.ErrGenerationBounds, want: &want{"host-a", 1, ""}},
		{name: "bump above the bound", act: func(id string) error {
			cur := f.vm(t, id)
			_, err := f.b.Bump(f.ctx, registry.Bump{VM: id, Expect: &cur, Owner: "host-b", Generation: max + 1})
			return err
		}, err: registry.ErrGenerationBounds, want: &want{"host-a", 1, ""}},
		{name: "bump to fenced host", act: func(id string) error {
			cur := f.vm(t, id)
			_, err := f.op.Bump(f.ctx, registry.Bump{VM: id, Expect: &cur, Owner: "host-f", Generation: 2})
			return err
		}, err: registry.ErrHostFenced, want: &want{"host-a", 1, ""}},
		{name: "bump from a stale read", act: func(id string) error {
			stale := f.vm(t, id)
			if _, err := f.a.Commit(f.ctx, batch("", "host-a", "host-c", gen(id, 1))); err != nil {
				return err
			}
			_, err := f.b.Bump(f.ctx, registry.Bump{VM: id, Expect: &stale, Owner: "host-b", Generation: 5})
			return err
		}, err: registry.ErrWrongOwner, want: &want{"host-c", 2, ""}},
		{name: "bump while the owner is live", setup: func(t *testing.T, id string) {
			createVM(t, f, id)
			if err := f.a.Register(f.ctx, registry.Host{Name: "host-a", Addr: "127.0.0.1:1", Identity: registry.Identity{EK: "00", AK: "00"}}); err != nil {
				t.Fatal(err)
			}
		}, act: func(id string) error {
			cur := f.vm(t, id)
			_, err := f.b.Bump(f.ctx, registry.Bump{VM: id, Expect: &cur, Owner: "host-b", Generation: 2, OwnerNotLive: true})
			return err
		}, err: registry.ErrHostLive, want: &want{"host-a", 1, ""}},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			id := fmt.Sprintf("vm-%02d", i)
			if tt.setup == nil {
				createVM(t, f, id)
			} else {
				tt.setup(t, id)
			}
			mustErrIs(t, tt.act(id), tt.err)
			v, err := f.op.VMs(f.ctx, id)
			if err != nil {
				t.Fatal(err)
			}
			got, ok := v.VMs[id]
			if tt.want == nil {
				if ok {
					t.Fatalf("VM recorded: %+v", got)
				}
				return
			}
			tx := ""
			if got.Tx != nil {
				tx = got.Tx.ID
			}
			if !ok || got.Owner != tt.want.owner || got.Generation != tt.want.gen || tx != tt.want.tx {
				t.Fatalf("record %+v (tx %q), want %+v", got, tx, *tt.want)
			}
		})
	}
}

func createVM(t *testing.T, f *regFleet, id string) {
	t.Helper()
	if _, err := f.op.CreateVM(f.ctx, id, "host-a"); err != nil {
		t.Fatal(err)
	}
}

func begun(f *regFleet, tx, to string) func(t *testing.T, id string) {
	return func(t *testing.T, id string) {
		t.Helper()
		createVM(t, f, id)
		if _, err := f.a.Begin(f.ctx, batch(tx, "host-a", to, gen(id, 1))); err != nil {
			t.Fatal(err)
		}
	}
}

func bump(t *testing.T, f *regFleet, id string, g uint64) {
	t.Helper()
	if _, err := f.op.Bump(f.ctx, registry.Bump{VM: id, Owner: "host-a", Generation: g}); err != nil {
		t.Fatal(err)
	}
}

// TestConcurrentCommits: two hosts race to change the same VM from the
// same (owner, generation); exactly one wins every round.
func TestConcurrentCommits(t *testing.T) {
	for _, impl := range impls {
		t.Run(impl.name, func(t *testing.T) { testConcurrentCommits(t, impl.fleet(t)) })
	}
}

func testConcurrentCommits(t *testing.T, f *regFleet) {
	c := f.open(t, "host-c")
	createVM(t, f, "vm-race")
	g := uint64(1)
	owner := "host-a"
	for round := 0; round < 20; round++ {
		var wg sync.WaitGroup
		errs := make([]error, 2)
		tos := []string{"host-b", "host-c"}
		if owner == "host-b" {
			tos[0] = "host-a"
		} else if owner == "host-c" {
			tos[1] = "host-a"
		}
		for i, cl := range []registry.Registry{f.b, c} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, errs[i] = cl.Commit(f.ctx, batch("", owner, tos[i], gen("vm-race", g)))
			}()
		}
		wg.Wait()
		wins := 0
		for i, err := range errs {
			if err == nil {
				wins++
				owner = tos[i]
			} else if !errorsIsAny(err, registry.ErrWrongOwner, registry.ErrStaleGeneration) {
				t.Fatalf("round %d: loser's error %v", round, err)
			}
		}
		if wins != 1 {
			t.Fatalf("round %d: %d winners (%v)", round, wins, errs)
		}
		g++
		if v := f.vm(t, "vm-race"); v.Owner != owner || v.Generation != g {
			t.Fatalf("round %d: record %+v, want %s at %d", round, v, owner, g)
		}
	}
	// Concurrent Begins of one VM: exactly one opens its transaction.
	var wg sync.WaitGroup
	errs := make([]error, 4)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			to := "host-b"
			if owner == "host-b" {
				to = "host-c"
			}
			_, errs[i] = f.op.Begin(f.ctx, batch(fmt.Sprintf("tx-%d", i), owner, to, gen("vm-race", g)))
		}()
	}
	wg.Wait()
	wins := 0
	for _, err := range errs {
		if err == nil {
			wins++
		} else if !errorsIsAny(err, registry.ErrBusy) {
			t.Fatalf("loser's error %v", err)
		}
	}
	if wins != 1 {
		t.Fatalf("%d Begins won", wins)
	}
}

func errorsIsAny(err error, targets ...error) bool {
	for _, t := range targets {
		if errorsIs(err, t) {
			return true
		}
	}
	return false
}

// TestFakeFollowsLiveness: the fake's injected failures and lease expiry,
// as orchestration tests use them.
func TestFakeFollowsLiveness(t *testing.T) {
	fk := registrytest.NewFake()
	op, a, b := fk.Client("root"), fk.Client("host-a"), fk.Client("host-b")
	ctx := t.Context()
	registrytest.Enroll(t, op, "host-a", "host-b")
	if err := a.Register(ctx, hostRecord("host-a")); err != nil {
		t.Fatal(err)
	}
	vm, err := a.CreateVM(ctx, "vm-1", "host-a")
	if err != nil {
		t.Fatal(err)
	}
	_, err = b.Bump(ctx, registry.Bump{VM: "vm-1", Expect: &vm, Owner: "host-b", Generation: 2, OwnerNotLive: true})
	mustErrIs(t, err, registry.ErrHostLive)
	fk.Expire("host-a")
	if _, err := b.Bump(ctx, registry.Bump{VM: "vm-1", Expect: &vm, Owner: "host-b", Generation: 2, OwnerNotLive: true}); err != nil {
		t.Fatal(err)
	}
	fk.Fail = func(op, host string) error {
		if op == "commit" {
			return registry.ErrNoQuorum
		}
		return nil
	}
	_, err = b.Commit(ctx, batch("", "host-b", "host-a", gen("vm-1", 2)))
	mustErrIs(t, err, registry.ErrNoQuorum)
	if v := b.Cached("vm-1").VMs["vm-1"]; v.Owner != "host-b" || v.Generation != 2 {
		t.Fatalf("last view %+v", v)
	}
}
