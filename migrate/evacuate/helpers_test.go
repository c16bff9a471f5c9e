package evacuate_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/migrate/evacuate"
	"github.com/vtpmm/vtpmm/migrate/evacuate/fake"
)

const (
	GiB    = uint64(1) << 30
	source = "host-a"
)

func vmID(i int) string { return fmt.Sprintf("00000000-0000-4000-8000-%012d", i) }

// fleet is a source host with VMs and destination hosts, on fakes that
// follow the registry's and libvirt's rules.
type fleet struct {
	reg   *fake.Registry
	world *fake.World
	clock *fake.Clock
	ids   []string
	dests []string
}

// newFleet puts n VMs of mem bytes each on host-a, and destinations
// host-b, host-c, ... with free bytes each.
func newFleet(t testing.TB, n int, mem uint64, free ...uint64) *fleet {
	t.Helper()
	f := &fleet{reg: fake.NewRegistry(), world: fake.NewWorld(), clock: fake.NewClock(time.Date(2026, 5, 1, 10, 0, 0, 0, time.UTC))}
	f.reg.AddHost(evacuate.Host{Name: source, State: evacuate.HostActive, Live: true, Enrolled: true})
	f.world.AddHost(source, uint64(n)*mem+GiB)
	for i, fr := range free {
		name := fmt.Sprintf("host-%c", 'b'+i)
		f.dests = append(f.dests, name)
		f.reg.AddHost(evacuate.Host{Name: name, State: evacuate.HostActive, Live: true, Enrolled: true})
		f.world.AddHost(name, fr)
	}
	for i := range n {
		id := vmID(i)
		f.ids = append(f.ids, id)
		f.world.AddVM(evacuate.VM{ID: id, Name: fmt.Sprintf("vm%03d", i), Memory: mem, Running: true}, source, 1)
		f.reg.AddVM(id, source, 1)
	}
	return f
}

// process is one vtpmd: its registry client (and session) and its mover.
type process struct {
	client *fake.Client
	mover  *fake.Mover
}

func (f *fleet) process() *process {
	c := f.reg.Connect()
	return &process{client: c, mover: &fake.Mover{Source: source, Registry: c, World: f.world, Now: f.clock.Now}}
}

// recorder collects events; hook, when set, sees each one as it comes.
type recorder struct {
	mu     sync.Mutex
	events []evacuate.Event
	hook   func(evacuate.Event)
}

func (r *recorder) Event(e evacuate.Event) {
	r.mu.Lock()
	r.events = append(r.events, e)
	hook := r.hook
	r.mu.Unlock()
	if hook != nil {
		hook(e)
	}
}

func (r *recorder) ofType(t evacuate.EventType) []evacuate.Event {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []evacuate.Event
	for _, e := range r.events {
		if e.Type == t {
			out = append(out, e)
		}
	}
	return out
}

func (f *fleet) evacuator(t testing.TB, p *process, sink evacuate.Sink) *evacuate.Evacuator {
	t.Helper()
	e, err := evacuate.New(evacuate.Config{
		Source: source, Fleet: p.client, Ownership: p.client, Records: p.client,
		Inventory: f.world.Inventory(source), Capacity: f.world, Mover: p.mover,
		Session: p.client.Session(), HolderID: "test@" + p.client.Session(), Events: sink,
		Now: f.clock.Now, Sleep: f.clock.Sleep, Rand: rand.NewChaCha8([32]byte{byte(len(p.client.Session()))}),
		SettleTimeout: 30 * time.Second, PollInterval: time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	return e
}

// checkConsistent asserts the end state every fault must leave: each VM
// runs on exactly the host the registry names as its owner, that host
// holds its key at the registry's generation and no other host holds one,
// no transaction is open and no PENDING key is left.
func (f *fleet) checkConsistent(t *testing.T) {
	t.Helper()
	hosts := append([]string{source}, f.dests...)
	for _, id := range f.ids {
		rec, ok := f.reg.VM(id)
		if !ok {
			t.Fatalf("VM %s vanished from the registry", id)
		}
		if w := f.world.Where(id); w != rec.Owner {
			t.Errorf("VM %s runs on %s, the registry says %s owns it", id, w, rec.Owner)
		}
		for _, h := range hosts {
			gen, has := f.world.Key(h, id)
			switch {
			case h == rec.Owner && (!has || gen != rec.Generation):
				t.Errorf("owner %s of VM %s holds key generation %d (has %v), registry %d", h, id, gen, has, rec.Generation)
			case h != rec.Owner && has:
				t.Errorf("VM %s: %s still holds a key (generation %d) though %s owns it", id, h, gen, rec.Owner)
			}
		}
	}
	if open := f.reg.OpenTxs(); len(open) > 0 {
		t.Errorf("%d VMs left with an open transaction: %v", len(open), open)
	}
	if n := f.world.Pending(); n > 0 {
		t.Errorf("%d PENDING keys left on destinations", n)
	}
}

// placement counts the VMs on each host.
func (f *fleet) placement() map[string]int {
	out := map[string]int{}
	for _, id := range f.ids {
		out[f.world.Where(id)]++
	}
	return out
}

func counts(rep *evacuate.Report) map[evacuate.Outcome]int { return rep.Counts }

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}
