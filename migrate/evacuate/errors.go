package evacuate

import "errors"

// Sentinel errors of package evacuate. Match them with errors.Is.
var (
	// ErrBusy means another evacuator holds the source's evacuation record
	// and its registry session is alive.
	ErrBusy = errors.New("another evacuation of this host is running")
	// ErrConflict means a compare-and-swap in the registry lost: the record
	// changed since it was read.
	ErrConflict = errors.New("registry record changed since it was read")
	// ErrNotFound means the registry has no such record.
	ErrNotFound = errors.New("no such registry record")
	// ErrUnknownHost means a host named by the operator is not in the registry.
	ErrUnknownHost = errors.New("host not known to the registry")
	// ErrSourceFenced means the source host is fenced: its VMs belong to
	// failover, not to an evacuation.
	ErrSourceFenced = errors.New("source host is fenced")
	// ErrHostNotActive means the registry refused a move to a host that is
	// draining or fenced (rule of the registry: no migration targets such a host).
	ErrHostNotActive = errors.New("destination host is not active")
	// ErrDestinationDown means the destination failed during a batch (its
	// agent or hypervisor became unreachable); the VMs that had not moved
	// were rolled back and still run on the source.
	ErrDestinationDown = errors.New("destination failed during the batch")
	// ErrBadRecord means an evacuation record failed to decode or validate.
	ErrBadRecord = errors.New("malformed evacuation record")
	// ErrBadInput means the planner or the runner was given inconsistent
	// input (duplicate VMs or hosts, --to naming the source, ...).
	ErrBadInput = errors.New("invalid evacuation input")
	// ErrStopped means the evacuation was stopped (Ctrl-C): no new
	// migration starts; those in flight finish and commit.
	ErrStopped = errors.New("evacuation stopped")
)
