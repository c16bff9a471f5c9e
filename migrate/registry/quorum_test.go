package registry_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/migrate/registry/registrytest"
)

// mover moves one VM back and forth between host-a and host-b with
// Begin+Commit and keeps track of where it is.
type mover struct {
	t     *testing.T
	cl    map[string]*registry.Client
	vm    string
	owner string
	gen   uint64
	n     int
}

func (m *mover) move(ctx context.Context) error {
	to := "host-b"
	if m.owner == "host-b" {
		to = "host-a"
	}
	m.n++
	b := batch(fmt.Sprintf("tx-%d", m.n), m.owner, to, gen(m.vm, m.gen))
	c := m.cl[m.owner]
	if _, err := c.Begin(ctx, b); err != nil {
		return err
	}
	if _, err := c.Commit(ctx, b); err != nil {
		return err
	}
	m.owner, m.gen = to, m.gen+1
	return nil
}

// TestQuorum: with 3 members, losing one changes nothing; losing two makes
// every change fail closed with ErrNoQuorum (reads too) while the last
// view stays available; restarting a member brings everything back.
func TestQuorum(t *testing.T) {
	t0 := time.Now()
	c := registrytest.Start(t, registrytest.Options{Members: 3, OpTimeout: time.Second})
	ctx := t.Context()
	op := c.Open(t, "root")
	registrytest.Enroll(t, op, "host-a", "host-b")
	following := func(h string) *registry.Client {
		cfg := c.Config(h)
		cfg.NoFollow = false
		return c.OpenConfig(t, cfg)
	}
	m := &mover{t: t, vm: "vm-q", owner: "host-a", gen: 1,
		cl: map[string]*registry.Client{"host-a": following("host-a"), "host-b": following("host-b")}}
	if _, err := m.cl["host-a"].CreateVM(ctx, "vm-q", "host-a"); err != nil {
		t.Fatal(err)
	}
	if err := m.move(ctx); err != nil {
		t.Fatal(err)
	}

	t.Logf("stop member-3 at %v", time.Since(t0))
	c.StopMember("member-3")
	for i := 0; i < 3; i++ {
		if err := m.move(ctx); err != nil {
			t.Fatalf("with one member down: %v", err)
		}
	}

	owner := m.cl[m.owner]
	// The owner got the VM through the other host's Commit; its last view
	// follows that change (a watch), before the quorum goes.
	view := waitCached(t, owner, "vm-q", m.owner, m.gen)
	c.StopMember("member-2")
	start := time.Now()
	err := m.move(ctx)
	t.Logf("without quorum: %v after %v", err, time.Since(start))
	mustErrIs(t, err, registry.ErrNoQuorum)
	_, err = owner.VMs(ctx, "vm-q")
	mustErrIs(t, err, registry.ErrNoQuorum)
	last := owner.Cached("vm-q")
	if !last.Stale || last.VMs["vm-q"].Owner != m.owner || last.VMs["vm-q"].Generation != m.gen || last.Rev < view.Rev {
		t.Fatalf("last view %+v, want %s at %d", last, m.owner, m.gen)
	}

	t.Logf("restart member-2 at %v", time.Since(t0))
	if err := c.StartMember("member-2", c.Members, "new"); err != nil {
		t.Fatal(err)
	}
	t.Logf("member-2 ready at %v", time.Since(t0))
	// The refused change's outcome was unknown (its proposal may have
	// reached the old leader's log): the same change again settles it,
	// whichever way it went.
	b := batch(fmt.Sprintf("tx-%d", m.n), m.owner, other(m.owner), gen("vm-q", m.gen))
	err = retryNoQuorum(ctx, func() error {
		if _, err := owner.Begin(ctx, b); err != nil && !errors.Is(err, registry.ErrBusy) {
			return err
		}
		_, err := owner.Commit(ctx, b)
		return err
	})
	if err != nil {
		t.Fatalf("after restart: %v", err)
	}
	m.owner, m.gen = other(m.owner), m.gen+1
	if err := m.move(ctx); err != nil {
		t.Fatal(err)
	}
	if v := vmOf(t, op, "vm-q"); v.Owner != m.owner || v.Generation != m.gen {
		t.Fatalf("record %+v, want %s at %d", v, m.owner, m.gen)
	}
	t.Logf("done at %v", time.Since(t0))
}

func waitCached(t *testing.T, c *registry.Client, id, owner string, gen uint64) registry.View {
	t.Helper()
	for i := 0; i < 300; i++ {
		v := c.Cached(id)
		if vm := v.VMs[id]; vm.Owner == owner && vm.Generation == gen {
			return v
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("the last view never showed %s at %s/%d: %+v", id, owner, gen, c.Cached(id))
	return registry.View{}
}

func other(h string) string {
	if h == "host-a" {
		return "host-b"
	}
	return "host-a"
}

func vmOf(t *testing.T, c *registry.Client, id string) registry.VM {
	t.Helper()
	v, err := c.VMs(t.Context(), id)
	if err != nil {
		t.Fatal(err)
	}
	return v.VMs[id]
}

// retryNoQuorum retries f while the cluster elects a leader after a
// restart (bounded: 100 tries, 10 s).
func retryNoQuorum(ctx context.Context, f func() error) error {
	var err error
	for i := 0; i < 100; i++ {
		if err = f(); !errors.Is(err, registry.ErrNoQuorum) {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	return err
}

// TestMemberReplacement: a member is lost (its disk too) and replaced by a
// new member through the cluster API while changes run; every change
// lands exactly once and the new member serves the same records.
func TestMemberReplacement(t *testing.T) {
	c := registrytest.Start(t, registrytest.Options{Members: 3, Spares: []string{"member-4"}})
	ctx := t.Context()
	op := c.Open(t, "root")
	registrytest.Enroll(t, op, "host-a", "host-b")
	m := &mover{t: t, vm: "vm-r", owner: "host-a", gen: 1,
		cl: map[string]*registry.Client{"host-a": c.Open(t, "host-a"), "host-b": c.Open(t, "host-b")}}
	if _, err := m.cl["host-a"].CreateVM(ctx, "vm-r", "host-a"); err != nil {
		t.Fatal(err)
	}

	// Changes run in the background while the member is replaced.
	stop := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		moved := 0
		for {
			select {
			case <-stop:
				if moved == 0 {
					done <- errors.New("no change ran during the replacement")
					return
				}
				done <- nil
				return
			default:
			}
			if err := retryNoQuorum(ctx, func() error { return m.move(ctx) }); err != nil {
				done <- err
				return
			}
			moved++
		}
	}()

	c.StopMember("member-3")
	c.WipeMember("member-3")
	var err error
	if err = op.RemoveMember(ctx, "member-3"); err != nil {
		t.Fatal(err)
	}
	m4 := c.NewMember("member-4")
	// etcd adds a member only once the others were connected for 5 s
	// (strict reconfiguration check): retry until then.
	var existing []registry.Member
	err = retryNoQuorum(ctx, func() (err error) {
		existing, err = op.AddMember(ctx, m4)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.StartMember("member-4", append(existing, m4), "existing"); err != nil {
		t.Fatal(err)
	}
	close(stop)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	members, err := op.Members(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("members after replacement: %+v; %d changes ran", members, m.gen-1)
	if len(members) != 3 {
		t.Fatalf("members %+v", members)
	}
	// Read from the new member alone.
	cfg := c.Config("host-a")
	cfg.Endpoints = []string{m4.ClientURL}
	fresh := c.OpenConfig(t, cfg)
	v := vmOf(t, fresh, "vm-r")
	if v.Owner != m.owner || v.Generation != m.gen {
		t.Fatalf("new member serves %+v, want %s at %d", v, m.owner, m.gen)
	}
}
