package registrytest

import (
	"context"
	"fmt"

	"github.com/vtpmm/vtpmm/migrate/registry"
)

// The fake's ownership operations: the same compare-and-swap rules as
// the real registry (docs/registry.md), checked against the same table.

// hostErr checks a host that is to receive or own VMs.
func (c *FakeClient) hostErr(host string, active bool) error {
	if _, ok := c.f.enrol[host]; !ok {
		return fmt.Errorf("host %s: %w (rule enrolled)", host, registry.ErrNotEnrolled)
	}
	switch s := c.f.states[host]; {
	case s == registry.StateFenced:
		return fmt.Errorf("host %s: %w (rule host-fenced)", host, registry.ErrHostFenced)
	case active && s != registry.StateActive:
		return fmt.Errorf("host %s is %s: %w (rule host-active)", host, s, registry.ErrHostNotActive)
	}
	return nil
}

// CreateVM implements registry.Ownership.
func (c *FakeClient) CreateVM(_ context.Context, id, owner string) (registry.VM, error) {
	if err := c.begin("create VM"); err != nil {
		return registry.VM{}, err
	}
	defer c.f.mu.Unlock()
	vm := registry.VM{V: registry.Version, ID: id, Owner: owner, Generation: 1}
	if _, err := registry.DecodeVM(mustJSON(vm)); err != nil {
		return registry.VM{}, fmt.Errorf("registry: create VM %s: %w", id, err)
	}
	if _, ok := c.f.vms[id]; ok {
		return registry.VM{}, fmt.Errorf("registry: create VM %s: %w (rule create-once)", id, registry.ErrExists)
	}
	if err := c.hostErr(owner, false); err != nil {
		return registry.VM{}, fmt.Errorf("registry: create VM %s: %w", id, err)
	}
	c.f.rev++
	c.f.vms[id] = vm
	c.remember(vm)
	return vm, nil
}

// VMs implements registry.Ownership.
func (c *FakeClient) VMs(_ context.Context, ids ...string) (registry.View, error) {
	if err := c.begin("read VMs"); err != nil {
		return registry.View{}, err
	}
	defer c.f.mu.Unlock()
	v := registry.View{Rev: c.f.rev, VMs: map[string]registry.VM{}}
	if len(ids) == 0 {
		for id, vm := range c.f.vms {
			v.VMs[id] = vm
		}
	}
	for _, id := range ids {
		if vm, ok := c.f.vms[id]; ok {
			v.VMs[id] = vm
		} else {
			delete(c.cache, id)
		}
	}
	c.remember(mapVMs(v.VMs)...)
	return v, nil
}

// Cached implements registry.Ownership.
func (c *FakeClient) Cached(ids ...string) registry.View {
	c.f.mu.Lock()
	defer c.f.mu.Unlock()
	v := registry.View{Rev: c.crev, VMs: map[string]registry.VM{}, Stale: true}
	for id, vm := range c.cache {
		v.VMs[id] = vm
	}
	if len(ids) > 0 {
		sel := map[string]registry.VM{}
		for _, id := range ids {
			if vm, ok := v.VMs[id]; ok {
				sel[id] = vm
			}
		}
		v.VMs = sel
	}
	return v
}

// Begin implements registry.Ownership.
func (c *FakeClient) Begin(_ context.Context, b registry.Batch) ([]registry.VM, error) {
	return c.cas("begin", b, true, func(v registry.VMGen) (registry.VM, registry.VM) {
		cur := registry.VM{V: 1, ID: v.ID, Owner: b.From, Generation: v.Generation}
		next := cur
		next.Tx = &registry.OpenTx{ID: b.TxID, To: b.To}
		return cur, next
	}, func() error { return c.hostErr(b.To, true) })
}

// Commit implements registry.Ownership.
func (c *FakeClient) Commit(_ context.Context, b registry.Batch) ([]registry.VM, error) {
	return c.cas("commit", b, false, func(v registry.VMGen) (registry.VM, registry.VM) {
		cur := registry.VM{V: 1, ID: v.ID, Owner: b.From, Generation: v.Generation}
		if b.TxID != "" {
			cur.Tx = &registry.OpenTx{ID: b.TxID, To: b.To}
		}
		return cur, registry.VM{V: 1, ID: v.ID, Owner: b.To, Generation: v.Generation + 1}
	}, func() error { return c.hostErr(b.To, false) })
}

// Abort implements registry.Ownership.
func (c *FakeClient) Abort(_ context.Context, b registry.Batch) ([]registry.VM, error) {
	return c.cas("abort", b, true, func(v registry.VMGen) (registry.VM, registry.VM) {
		cur := registry.VM{V: 1, ID: v.ID, Owner: b.From, Generation: v.Generation, Tx: &registry.OpenTx{ID: b.TxID, To: b.To}}
		return cur, registry.VM{V: 1, ID: v.ID, Owner: b.From, Generation: v.Generation}
	}, nil)
}

func sameVM(a, b registry.VM) bool {
	if a.Owner != b.Owner || a.Generation != b.Generation || (a.Tx == nil) != (b.Tx == nil) {
		return false
	}
	return a.Tx == nil || *a.Tx == *b.Tx
}

func (c *FakeClient) cas(op string, b registry.Batch, needTx bool, step func(registry.VMGen) (registry.VM, registry.VM), host func() error) ([]registry.VM, error) {
	name := "registry: " + op + " " + b.TxID
	if err := validBatch(b, needTx); err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if err := c.begin(op); err != nil {
		return nil, err
	}
	defer c.f.mu.Unlock()
	var errs []error
	nexts := make([]registry.VM, 0, len(b.VMs))
	atExp, atNext := 0, 0
	for _, v := range b.VMs {
		exp, next := step(v)
		if (op == "begin" || op == "commit") && v.Generation >= registry.MaxGeneration {
			return nil, fmt.Errorf("%s: VM %s: %w (rule generation-bounds)", name, v.ID, registry.ErrGenerationBounds)
		}
		nexts = append(nexts, next)
		cur, ok := c.f.vms[v.ID]
		switch {
		case !ok:
			errs = append(errs, fmt.Errorf("VM %s: %w (rule vm-present)", v.ID, registry.ErrNotFound))
		case sameVM(cur, exp):
			atExp++
		case sameVM(cur, next):
			atNext++ // already as this change leaves it (a retry)
		case cur.Owner != exp.Owner:
			errs = append(errs, fmt.Errorf("VM %s: %w: owner is %s (rule owner)", v.ID, registry.ErrWrongOwner, cur.Owner))
		case cur.Generation != exp.Generation:
			errs = append(errs, fmt.Errorf("VM %s: %w: generation is %d (rule generation)", v.ID, registry.ErrStaleGeneration, cur.Generation))
		default:
			errs = append(errs, fmt.Errorf("VM %s: %w (rule open-transaction)", v.ID, registry.ErrBusy))
		}
	}
	if host != nil && atNext < len(b.VMs) {
		if err := host(); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("%s: %w", name, joinErrs(errs))
	}
	switch {
	case atExp == len(b.VMs):
		c.f.rev++
		for _, n := range nexts {
			c.f.vms[n.ID] = n
		}
	case atNext != len(b.VMs):
		return nil, fmt.Errorf("%s: %w: the records changed during the change; read again", name, registry.ErrConflict)
	}
	c.remember(nexts...)
	return nexts, nil
}

// Bump implements registry.Ownership.
func (c *FakeClient) Bump(_ context.Context, b registry.Bump) (registry.VM, error) {
	name := "registry: bump " + b.VM
	if b.Generation == 0 || b.Generation > registry.MaxGeneration || (b.Expect != nil && b.Generation <= b.Expect.Generation) {
		return registry.VM{}, fmt.Errorf("%s: %w (rule generation-bounds)", name, registry.ErrGenerationBounds)
	}
	if err := c.begin("bump"); err != nil {
		return registry.VM{}, err
	}
	defer c.f.mu.Unlock()
	var errs []error
	cur, ok := c.f.vms[b.VM]
	switch {
	case b.Expect == nil && ok:
		errs = append(errs, fmt.Errorf("%w (rule expect)", registry.ErrExists))
	case b.Expect != nil && !ok:
		errs = append(errs, fmt.Errorf("%w (rule vm-present)", registry.ErrNotFound))
	case b.Expect != nil && cur.Owner != b.Expect.Owner:
		errs = append(errs, fmt.Errorf("%w (rule owner)", registry.ErrWrongOwner))
	case b.Expect != nil && cur.Generation != b.Expect.Generation:
		errs = append(errs, fmt.Errorf("%w (rule generation)", registry.ErrStaleGeneration))
	case b.Expect != nil && !sameVM(cur, *b.Expect):
		errs = append(errs, fmt.Errorf("%w (rule open-transaction)", registry.ErrBusy))
	}
	if err := c.hostErr(b.Owner, false); err != nil {
		errs = append(errs, err)
	}
	if b.OwnerNotLive && b.Expect != nil && c.f.live[b.Expect.Owner] {
		errs = append(errs, fmt.Errorf("host %s: %w (rule owner-not-live)", b.Expect.Owner, registry.ErrHostLive))
	}
	if len(errs) > 0 {
		return registry.VM{}, fmt.Errorf("%s: %w", name, joinErrs(errs))
	}
	next := registry.VM{V: registry.Version, ID: b.VM, Owner: b.Owner, Generation: b.Generation}
	c.f.rev++
	c.f.vms[b.VM] = next
	c.remember(next)
	return next, nil
}

func validBatch(b registry.Batch, needTx bool) error {
	if (needTx && b.TxID == "") || b.From == "" || b.To == "" || len(b.VMs) == 0 {
		return fmt.Errorf("%w: incomplete batch", registry.ErrBadRecord)
	}
	if b.From == b.To && b.TxID == "" {
		return fmt.Errorf("%w: source and destination are both %s without a transaction", registry.ErrBadRecord, b.From)
	}
	seen := map[string]bool{}
	for _, v := range b.VMs {
		if seen[v.ID] {
			return fmt.Errorf("%w: VM %s twice in the batch", registry.ErrBadRecord, v.ID)
		}
		seen[v.ID] = true
		if v.Generation == 0 || v.Generation > registry.MaxGeneration {
			return fmt.Errorf("VM %s: %w (rule generation-bounds)", v.ID, registry.ErrGenerationBounds)
		}
	}
	return nil
}
