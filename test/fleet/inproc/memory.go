package inproc

import (
	"context"
	"fmt"
)

// The fake hypervisor has no memory; an evacuation's placement asks the
// fleet (daemon.Deps.FreeMemory, VMMemory) as vtpmd would ask libvirt.

// Defaults of the fleet's memory model.
const (
	DefaultFreeMemory uint64 = 64 << 30 // every host's free memory
	DefaultVMMemory   uint64 = 1 << 30  // every VM's memory
)

// SetFreeMemory sets what host's hypervisor reports as free memory (0:
// the default).
func (f *Fleet) SetFreeMemory(host string, bytes uint64) {
	f.memMu.Lock()
	defer f.memMu.Unlock()
	if f.free == nil {
		f.free = map[string]uint64{}
	}
	f.free[host] = bytes
}

// FreeMemory reports host's free memory (daemon.Deps.FreeMemory).
func (f *Fleet) FreeMemory(_ context.Context, host string) (uint64, error) {
	if _, ok := f.hosts[host]; !ok {
		return 0, fmt.Errorf("inproc: no hypervisor host %s", host)
	}
	f.memMu.Lock()
	defer f.memMu.Unlock()
	if b, ok := f.free[host]; ok && b > 0 {
		return b, nil
	}
	return DefaultFreeMemory, nil
}

// VMMemory reports a VM's memory (daemon.Deps.VMMemory).
func (f *Fleet) VMMemory(context.Context, string) (uint64, error) { return DefaultVMMemory, nil }
