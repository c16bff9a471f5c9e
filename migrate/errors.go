package migrate

import (
	"errors"

	"github.com/vtpmm/vtpmm/internal/errclass"
)

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
	// ErrNotStarted means a VM's hypervisor migration never started (no
	// migration slot: its evacuation was stopped); the VM stays on the source.
	ErrNotStarted = errors.New("hypervisor migration not started")
	// ErrCrash is returned at an injected crash point: the node stops as if
	// its process had died there. Tests use it; production never injects it.
	ErrCrash = errclass.New(errclass.Crash, "injected crash")
	// ErrUnresolved means recovery could not decide yet (the peer is
	// unreachable); the VM keeps running where it runs, and a later
	// Reconcile finishes the job.
	ErrUnresolved = errclass.New(errclass.Unresolved, "transaction not resolved yet")
	// ErrRegistryUnavailable means the fleet registry has no quorum or
	// cannot be reached: an ownership change fails closed (nothing moved,
	// or, at the commit, the transaction stays open for Reconcile), and
	// running VMs are untouched. The chain also holds the registry's own
	// sentinel (registry.ErrNoQuorum, ErrTLS, ...).
	ErrRegistryUnavailable = errclass.New(errclass.RegistryUnavailable, "fleet registry unavailable")
	// ErrRegistryRefused means the fleet registry's compare-and-swap
	// refused an ownership change: the destination is not enrolled, not
	// active or fenced, or the record is not what this host expected. The
	// chain names each VM and the rule it failed (registry.ErrHostFenced,
	// ...).
	ErrRegistryRefused = errclass.New(errclass.RegistryRefused, "refused by the fleet registry")
	// ErrDenied means a destination's authorisation refused a request
	// (authz.go); the error is an *AuthzError naming the rule. A refused
	// Prepare left nothing on the destination.
	ErrDenied = errclass.New(errclass.Denied, "refused by the destination's authorisation")
	// ErrFailoverRefused means a failover's rule refused the promotion
	// (the owner is live, nothing fenced it, the replica is stale): nothing
	// changed. The error names the rule (failover.go).
	ErrFailoverRefused = errclass.New(errclass.Refused, "failover refused")
	// ErrDestTPM means the destination's TPM failed (the transfer key did
	// not unwrap); nothing was migrated.
	ErrDestTPM = errclass.New(errclass.TPM, "the destination's TPM failed")
	// ErrNoSpace means a host's disk is full.
	ErrNoSpace = errclass.New(errclass.NoSpace, "no space left on the host's disk")
	// ErrDomainHere refuses a key-only move (Request.KeyOnly) of a VM
	// whose domain is defined on the source: its key moves with it, by a
	// migration.
	ErrDomainHere = errors.New("the VM's domain is defined on this host")
	// ErrNoDomain means a key-only move's destination does not hold the
	// VM's domain (shut off): the key stays on the source.
	ErrNoDomain = errors.New("the destination does not hold the VM's domain")
)

// Sentinel errors of the ledger check (ledger_check.go). The damaged ones
// are of class damaged (internal/errclass), each matching only itself.
var (
	// ErrLedgerDamaged means the ledger file is damaged; the concrete error
	// is a *LedgerError naming the file, what is wrong and what to do.
	ErrLedgerDamaged = errclass.Mark(errclass.Damaged, "ledger file damaged")
	// ErrLedgerHistoryLost means the ledger is missing or empty although
	// the data directory shows this host had history (its rollback anchor
	// counted ownership changes): it must not be silently re-created.
	ErrLedgerHistoryLost = errclass.Mark(errclass.Damaged, "ledger history lost")
	// ErrLedgerInUse means another process holds the ledger open.
	ErrLedgerInUse = errors.New("ledger in use by another process")
)
