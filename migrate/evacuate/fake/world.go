package fake

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/migrate/evacuate"
)

// World is the fleet's hypervisors (libvirt's rules): where each VM runs,
// each host's free memory, and the vTPM keys (secrets) each host holds. A
// VM migrates only to a host that holds its key at the next generation
// for the transaction that prepared it.
type World struct {
	mu      sync.Mutex
	runs    map[string]string // VM -> host it runs on
	vms     map[string]evacuate.VM
	memory  map[string]uint64 // host -> free memory before its VMs are counted
	down    map[string]bool   // host's hypervisor (and agent) unreachable
	keys    map[string]map[string]uint64
	pending map[string]map[string]pendingKey
	arrived map[string]int // host -> migrations it received
	killAt  map[string]int // host -> it dies after this many arrivals
}

type pendingKey struct {
	tx  string
	gen uint64
}

// NewWorld returns an empty fleet.
func NewWorld() *World {
	return &World{runs: map[string]string{}, vms: map[string]evacuate.VM{}, memory: map[string]uint64{},
		down: map[string]bool{}, keys: map[string]map[string]uint64{}, pending: map[string]map[string]pendingKey{},
		arrived: map[string]int{}, killAt: map[string]int{}}
}

// AddHost adds a host with memory bytes for VMs.
func (w *World) AddHost(name string, memory uint64) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.memory[name] = memory
	w.keys[name] = map[string]uint64{}
	w.pending[name] = map[string]pendingKey{}
}

// AddVM defines a VM on host, holding its key at generation gen.
func (w *World) AddVM(vm evacuate.VM, host string, gen uint64) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.vms[vm.ID] = vm
	w.runs[vm.ID] = host
	w.keys[host][vm.ID] = gen
}

// Where returns the host a VM runs on.
func (w *World) Where(vm string) string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.runs[vm]
}

// Key returns the generation of the VM's key host holds (ok false: none).
func (w *World) Key(host, vm string) (uint64, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	g, ok := w.keys[host][vm]
	return g, ok
}

// Pending counts the PENDING keys left on every host.
func (w *World) Pending() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := 0
	for _, p := range w.pending {
		n += len(p)
	}
	return n
}

// SetDown makes a host's hypervisor and agent unreachable (or back).
func (w *World) SetDown(host string, down bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.down[host] = down
}

// KillAfter makes host die (hypervisor and agent) right after it received
// n migrations.
func (w *World) KillAfter(host string, n int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.killAt[host] = n
}

// IsDown reports whether host is down.
func (w *World) IsDown(host string) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.down[host]
}

// Inventory returns host's hypervisor as evacuate.Inventory.
func (w *World) Inventory(host string) evacuate.Inventory { return inventory{w: w, host: host} }

type inventory struct {
	w    *World
	host string
}

var _ evacuate.Inventory = inventory{}

// VMs implements evacuate.Inventory.
func (i inventory) VMs(ctx context.Context) ([]evacuate.VM, error) {
	i.w.mu.Lock()
	defer i.w.mu.Unlock()
	if i.w.down[i.host] {
		return nil, fmt.Errorf("list domains on %s: %w", i.host, hypervisor.ErrUnreachable)
	}
	var out []evacuate.VM
	for id, h := range i.w.runs {
		if h == i.host {
			out = append(out, i.w.vms[id])
		}
	}
	slices.SortFunc(out, func(a, b evacuate.VM) int { return cmp.Compare(a.ID, b.ID) })
	return out, nil
}

var _ evacuate.Capacity = (*World)(nil)

// FreeMemory implements evacuate.Capacity.
func (w *World) FreeMemory(ctx context.Context, host string) (uint64, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	mem, ok := w.memory[host]
	if !ok || w.down[host] {
		return 0, fmt.Errorf("free memory of %s: %w", host, hypervisor.ErrUnreachable)
	}
	for id, h := range w.runs {
		if h == host && w.vms[id].Running {
			mem -= min(mem, w.vms[id].Memory)
		}
	}
	return mem, nil
}

// prepare defines PENDING keys on dest for the VMs (the Prepare step); a
// VM in skip gets none (an injected fault).
func (w *World) prepare(dest, tx string, vms []evacuate.BatchVM, skip func(string) bool) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.down[dest] {
		return fmt.Errorf("prepare on %s: %w: %w", dest, evacuate.ErrDestinationDown, hypervisor.ErrUnreachable)
	}
	for _, vm := range vms {
		if !skip(vm.ID) {
			w.pending[dest][vm.ID] = pendingKey{tx: tx, gen: vm.Generation + 1}
		}
	}
	return nil
}

// migrate live-migrates vm from src to dest for transaction tx at
// generation gen, under libvirt's rules.
func (w *World) migrate(vm, src, dest, tx string, gen uint64) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	switch {
	case w.down[dest]:
		return fmt.Errorf("migrate %s to %s: %w", vm, dest, hypervisor.ErrUnreachable)
	case w.runs[vm] != src:
		return fmt.Errorf("migrate %s: %w on %s", vm, hypervisor.ErrNotRunning, src)
	}
	if p, ok := w.pending[dest][vm]; !ok || p.tx != tx || p.gen != gen {
		return fmt.Errorf("migrate %s to %s: %w", vm, dest, hypervisor.ErrSecretMissing)
	}
	w.runs[vm] = dest
	w.arrived[dest]++
	if k := w.killAt[dest]; k > 0 && w.arrived[dest] == k {
		w.down[dest] = true
	}
	return nil
}

// finish promotes the PENDING keys of the VMs that moved on dest and
// shreds the source's copies; it drops the others' PENDING keys.
func (w *World) finish(src, dest, tx string, moved map[string]uint64, dropped []string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for id, gen := range moved {
		delete(w.pending[dest], id)
		w.keys[dest][id] = gen
		delete(w.keys[src], id)
	}
	for _, id := range dropped {
		if p, ok := w.pending[dest][id]; ok && p.tx == tx {
			delete(w.pending[dest], id)
		}
	}
}

// Clock is a fake clock: Sleep advances it instead of waiting.
type Clock struct {
	mu sync.Mutex
	t  time.Time
}

// NewClock starts at t.
func NewClock(t time.Time) *Clock { return &Clock{t: t} }

// Now returns the fake time.
func (c *Clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

// Advance moves the clock on.
func (c *Clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// Sleep advances the clock by d at once (or fails when ctx ended).
func (c *Clock) Sleep(ctx context.Context, d time.Duration) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	c.Advance(d)
	return nil
}
