package recovery

import "errors"

// Sentinel errors of package recovery; the escrow package's (ErrStaleBundle,
// ErrOwnerActive, ErrNotEnoughShares, ErrTampered, ErrWrongVM...) and
// migrate's (ErrRefused, ErrDenied) pass through wrapped.
var (
	// ErrKeyProof means the destination answered with a key proof that
	// does not match the restored key: the restore was aborted.
	ErrKeyProof = errors.New("the destination's key proof does not match the restored key")
	// ErrNoRegistryRecord means the registry has no record of the VM, so
	// a restore could not fence older copies (not built: restore a VM the
	// registry knows).
	ErrNoRegistryRecord = errors.New("the fleet registry has no record of the VM")
	// ErrDestNotActive means the destination is draining or fenced.
	ErrDestNotActive = errors.New("the destination is not active")
)
