package migrate

import "errors"

// Sentinel errors of package migrate. Match them with errors.Is.
var (
	// ErrBusy means another migration of the same VM is in progress.
	ErrBusy = errors.New("VM is already being migrated")
	// ErrRefused means the destination failed attestation; the error chain
	// also holds the *attest.RefusalError naming the rule.
	ErrRefused = errors.New("destination refused by attestation policy")
	// ErrReplay means a transfer message was seen before.
	ErrReplay = errors.New("replayed transfer")
	// ErrUnknownTx means the transaction is not known on this host.
	ErrUnknownTx = errors.New("unknown transaction")
	// ErrBadMessage means a protocol message failed to decode or validate.
	ErrBadMessage = errors.New("malformed protocol message")
	// ErrPeer means the peer agent failed or could not be reached.
	ErrPeer = errors.New("peer agent unavailable")
	// ErrNotOwner means this host holds no active key for the VM.
	ErrNotOwner = errors.New("this host does not own the VM's vTPM")
	// ErrKeyProof means the destination could not prove it holds the key
	// that was sent; nothing was migrated.
	ErrKeyProof = errors.New("destination key proof mismatch")
	// ErrNotMigrating means a Pull named a VM this host's hypervisor is not
	// migrating away: keys are released only for a migration in progress.
	ErrNotMigrating = errors.New("the VM is not being migrated from this host")
	// ErrHypervisor means the hypervisor's migration failed; the VM stays on the source.
	ErrHypervisor = errors.New("hypervisor migration failed")
	// ErrCrash is returned at an injected crash point: the node stops as if
	// its process had died there. Tests use it; production never injects it.
	ErrCrash = errors.New("injected crash")
	// ErrUnresolved means recovery could not decide yet (the peer is
	// unreachable); the VM keeps running where it runs, and a later
	// Reconcile finishes the job.
	ErrUnresolved = errors.New("transaction not resolved yet")
)
