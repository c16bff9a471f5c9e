package inproc

import (
	"github.com/vtpmm/vtpmm/hypervisor/fake"
)

// Memory, for an evacuation's placement: each host's fake hypervisor
// reports its free memory and its VMs' memory (hypervisor.Capacity), and
// vtpmd asks it as it asks libvirt (the source's hypervisor, at each
// destination's migration target).

// Defaults of the fleet's memory model (the fake hypervisor's).
const (
	DefaultFreeMemory = fake.DefaultFreeMemory // every host's free memory
	DefaultVMMemory   = fake.DefaultVMMemory   // every VM's memory
)

// SetFreeMemory sets what host's hypervisor reports as free memory (0:
// the default). An unknown host is ignored.
func (f *Fleet) SetFreeMemory(host string, bytes uint64) {
	if h, ok := f.hosts[host]; ok {
		h.hyp.SetFreeMemory(bytes)
	}
}
