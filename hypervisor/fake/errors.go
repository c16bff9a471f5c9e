package fake

import "errors"

// Errors of the fake hypervisor that have no counterpart in package
// hypervisor. Match them with errors.Is.
var (
	// ErrBadConfig means a HostConfig, domain or state directory is invalid.
	ErrBadConfig = errors.New("invalid fake hypervisor config")
	// ErrHostExists means a host of that name is already on the network.
	ErrHostExists = errors.New("fake host already exists")
	// ErrDomainActive means the operation needs a domain that is shut off
	// (libvirt: "Requested operation is not valid: domain is already
	// running").
	ErrDomainActive = errors.New("domain is already running")
	// ErrBusy means the domain is busy with another job, e.g. a migration
	// (libvirt: "domain is already being migrated").
	ErrBusy = errors.New("domain is busy with another job")
	// ErrPowerCycled means the host lost power (PowerCycle) while the
	// operation ran: a start in flight does not survive it.
	ErrPowerCycled = errors.New("the host lost power during the operation")
	// ErrClosed means the host or network was closed.
	ErrClosed = errors.New("fake hypervisor closed")
)
