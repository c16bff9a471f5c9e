package hypervisor

import "context"

// Capacity is a hypervisor that reports memory, for an evacuation's
// placement (docs/evacuation.md). libvirt and the fake implement it; vtpmd
// falls back to count-balanced placement for a hypervisor that does not.
type Capacity interface {
	// FreeMemory reports the free memory, in bytes, of the host at dest
	// (libvirt: virNodeGetFreeMemory on the destination's libvirtd,
	// reached at the URI a migration uses).
	FreeMemory(ctx context.Context, dest Target) (uint64, error)
	// DomainMemory reports the memory, in bytes, a VM of this host needs
	// on a destination (libvirt: the domain's current memory).
	DomainMemory(ctx context.Context, vmUUID string) (uint64, error)
}

// MigrationProgress is a hypervisor that reports a running outgoing
// migration's progress (libvirt: virDomainGetJobStats, DataProcessed and
// DataTotal).
type MigrationProgress interface {
	// MigrationBytes reports the bytes a VM's outgoing migration has
	// transferred and the bytes it will transfer in all (0 when unknown).
	// active is false when no migration job runs for the VM here.
	MigrationBytes(ctx context.Context, vmUUID string) (processed, total uint64, active bool, err error)
}
