package fake

import (
	"context"
	"fmt"

	"github.com/vtpmm/vtpmm/hypervisor"
)

// The fake's memory: a host reports the free memory it was given
// (SetFreeMemory; DefaultFreeMemory until then) and every VM needs
// DefaultVMMemory. Nothing is reserved when a VM arrives: tests set what
// the placement must see.

// Defaults of the fake's memory model.
const (
	DefaultFreeMemory uint64 = 64 << 30 // a host's free memory
	DefaultVMMemory   uint64 = 1 << 30  // a VM's memory
)

var (
	_ hypervisor.Capacity          = (*Host)(nil)
	_ hypervisor.MigrationProgress = (*Host)(nil)
)

// SetFreeMemory sets what this host reports as free memory (0: the default).
func (h *Host) SetFreeMemory(bytes uint64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.free = bytes
}

func (h *Host) freeMemory() uint64 {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.free == 0 {
		return DefaultFreeMemory
	}
	return h.free
}

// FreeMemory reports the free memory of the host at dest (a host that is
// down or unknown: ErrUnreachable, as libvirt's connection fails).
func (h *Host) FreeMemory(ctx context.Context, dest hypervisor.Target) (uint64, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	d, err := h.net.resolve(dest)
	if err != nil {
		return 0, fmt.Errorf("free memory of %s: %w", targetName(dest), err)
	}
	return d.freeMemory(), nil
}

// DomainMemory reports a VM's memory: DefaultVMMemory for a domain defined
// here.
func (h *Host) DomainMemory(ctx context.Context, vmUUID string) (uint64, error) {
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if _, ok := h.domains[vmUUID]; !ok {
		return 0, fmt.Errorf("memory of %s on %s: %w", vmUUID, h.name, hypervisor.ErrNoDomain)
	}
	return DefaultVMMemory, nil
}

// MigrationBytes reports a running outgoing migration's bytes: the VM's
// memory plus its vTPM state in all, processed once the state was copied
// (the fake copies no guest memory; it counts it as moved with the state).
func (h *Host) MigrationBytes(ctx context.Context, vmUUID string) (processed, total uint64, active bool, err error) {
	if err := ctx.Err(); err != nil {
		return 0, 0, false, err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	d, ok := h.domains[vmUUID]
	if !ok || d.job != jobOutgoing {
		return 0, 0, false, nil
	}
	return d.jobProcessed, d.jobTotal, true, nil
}
