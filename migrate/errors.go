package migrate

import "github.com/vtpmm/vtpmm/internal/errclass"

// Sentinel errors of package migrate. Match them with errors.Is. Each is
// of its own class in internal/errclass, which gives its wire reason, gRPC
// code and admin API code; errors decoded from a peer match them too.
var (
	// ErrBusy means another migration of the same VM is in progress.
	ErrBusy = errclass.New(errclass.Busy, "VM is already being migrated")
	// ErrRefused means the destination failed attestation; the error chain
	// also holds the *attest.RefusalError naming the rule.
	ErrRefused = errclass.New(errclass.Refused, "destination refused by attestation policy")
	// ErrReplay means a transfer message was seen before.
	ErrReplay = errclass.New(errclass.Replay, "replayed transfer")
	// ErrUnknownTx means the transaction is not known on this host.
	ErrUnknownTx = errclass.New(errclass.UnknownTx, "unknown transaction")
	// ErrBadMessage means a protocol message failed to decode or validate.
	ErrBadMessage = errclass.New(errclass.BadMessage, "malformed protocol message")
	// ErrPeer means the peer agent failed or could not be reached.
	ErrPeer = errclass.New(errclass.Peer, "peer agent unavailable")
	// ErrNotOwner means this host holds no active key for the VM.
	ErrNotOwner = errclass.New(errclass.NotOwner, "this host does not own the VM's vTPM")
	// ErrKeyProof means the destination could not prove it holds the key
	// that was sent; nothing was migrated.
	ErrKeyProof = errclass.New(errclass.KeyProof, "destination key proof mismatch")
	// ErrNotMigrating means a Pull named a VM this host's hypervisor is not
	// migrating away: keys are released only for a migration in progress.
	ErrNotMigrating = errclass.New(errclass.NotMigrating, "the VM is not being migrated from this host")
	// ErrHypervisor means the hypervisor's migration failed; the VM stays on the source.
	ErrHypervisor = errclass.New(errclass.Hypervisor, "hypervisor migration failed")
	// ErrCrash is returned at an injected crash point: the node stops as if
	// its process had died there. Tests use it; production never injects it.
	ErrCrash = errclass.New(errclass.Crash, "injected crash")
	// ErrUnresolved means recovery could not decide yet (the peer is
	// unreachable); the VM keeps running where it runs, and a later
	// Reconcile finishes the job.
	ErrUnresolved = errclass.New(errclass.Unresolved, "transaction not resolved yet")
)
