package registry

import (
	"context"
	"io"
)

// Registry is what vtpmm needs from the fleet registry: three small parts,
// so that a consumer can depend on the one it uses (migrate: Ownership;
// the trust checks: Fleet; evacuation and standbys: Records). A nil
// Registry means ModeNone.
type Registry interface {
	Fleet
	Ownership
	Records
	// Snapshot writes a consistent etcd snapshot of the whole registry
	// (etcd's snapshot format; restore with etcdutl). With RBAC it needs
	// the operator's (root) identity.
	Snapshot(ctx context.Context, w io.Writer) error
	// Close stops liveness (revoking the lease: the host is at once no
	// longer live), closes the client and, in embedded mode, stops the
	// member. Idempotent.
	Close() error
}

// Fleet is the hosts' part: who exists, who is enrolled, who is live.
type Fleet interface {
	// Register writes this host's record (address, reported TPM identity)
	// and its liveness key, attached to a lease of Config.TTL that the
	// Registry keeps alive (re-granting it after a loss) until Close.
	Register(ctx context.Context, h Host) error
	// Hosts returns the named hosts (all when none is named) with their
	// state, liveness and enrolment, read at one revision: one round trip.
	Hosts(ctx context.Context, names ...string) (HostsView, error)
	// WatchLiveness reports hosts becoming live or not live from revision
	// fromRev (0: from now; HostsView.Rev+1: everything after that view).
	// The channel closes when ctx ends or the watch fails (a last event
	// carries the error).
	WatchLiveness(ctx context.Context, fromRev int64) <-chan LivenessEvent
	// Enroll writes a host's enrolment, once, and makes it active. It is
	// the operator's; a host's etcd user may not write it.
	Enroll(ctx context.Context, e Enrolment) error
	// Reenroll replaces a retired (fenced) host's enrolment with a new TPM
	// identity, keeping the replaced one in Enrolment.Replaced (never
	// trusted again), and makes the host active: the operator's, after
	// the host's TPM was replaced. It returns the record written.
	Reenroll(ctx context.Context, e Enrolment) (Enrolment, error)
	// SetState changes a host's state (draining, active, fenced). The
	// operator's.
	SetState(ctx context.Context, host string, s HostState) error
}

// Ownership is the VMs' part: who owns which vTPM at which generation, and
// every change of it as one compare-and-swap.
type Ownership interface {
	// CreateVM records a new VM at generation 1, owned by owner (enrolled,
	// not fenced); ErrExists if the VM is already recorded.
	CreateVM(ctx context.Context, vmID, owner string) (VM, error)
	// VMs reads the named VMs (all VMs when none is named) at one
	// revision: one round trip for up to Config.MaxTxnOps VMs. Absent VMs
	// are absent from the view. Fails closed (ErrNoQuorum) without quorum.
	VMs(ctx context.Context, ids ...string) (View, error)
	// Cached returns this host's last view of the named VMs (all it has
	// seen when none is named) without any I/O, with the revision it was
	// read at: what a host may go by while the registry has no quorum.
	Cached(ids ...string) View
	// Begin opens a migration of every VM in the batch (one transaction):
	// each VM must be owned by b.From at exactly its generation with no
	// open transaction, and b.To must be enrolled and active.
	Begin(ctx context.Context, b Batch) ([]VM, error)
	// Commit moves every VM of the batch to b.To at generation+1 (one
	// transaction): each VM must be as Begin left it (or, with an empty
	// TxID, owned by b.From at its generation with nothing open), and
	// b.To must not be fenced. Repeating a Commit that took effect
	// succeeds, so a commit whose outcome was unknown (ErrNoQuorum) is
	// retried safely.
	Commit(ctx context.Context, b Batch) ([]VM, error)
	// Abort closes the batch's open transaction; ownership and generation
	// stay (an aborted attempt burns no generation). Idempotent.
	Abort(ctx context.Context, b Batch) ([]VM, error)
	// Bump gives a VM a new owner at a generation above every one seen
	// (restore, failover promotion, repair after an old registry restore),
	// compared against the exact record the caller read.
	Bump(ctx context.Context, b Bump) (VM, error)
}

// Records is the part later features keep: standby replicas and
// evacuation plans.
type Records interface {
	// PutStandby records (or refreshes) a standby replica.
	PutStandby(ctx context.Context, s Standby) error
	// DropStandby removes a standby record (idempotent).
	DropStandby(ctx context.Context, vmID, host string) error
	// Standbys lists a VM's standby records: one round trip.
	Standbys(ctx context.Context, vmID string) ([]Standby, error)
	// Plan reads a source host's evacuation plan and its revision
	// (ErrNotFound if none).
	Plan(ctx context.Context, source string) (Plan, int64, error)
	// PutPlan writes the plan if its revision is still rev (0: it must not
	// exist yet) and returns the new revision; ErrConflict otherwise.
	PutPlan(ctx context.Context, p Plan, rev int64) (int64, error)
	// DeletePlan removes a plan at revision rev (ErrConflict otherwise).
	DeletePlan(ctx context.Context, source string, rev int64) error
}

// HostView is one host as the registry knows it.
type HostView struct {
	Name      string
	Host      *Host      // its own record; nil if it never registered
	State     HostState  // "" if not enrolled
	Live      bool       // its liveness lease is alive
	Enrolment *Enrolment // nil if not enrolled
}

// HostsView is a set of hosts read at one revision.
type HostsView struct {
	Rev   int64
	Hosts map[string]HostView
}

// LivenessEvent is a host becoming live or not live.
type LivenessEvent struct {
	Host string
	Live bool
	Rev  int64
	Err  error // set on the last event of a failed watch
}

// View is a set of VM records. Rev is the registry revision they were read
// at; Stale marks a view from the local cache (Cached).
type View struct {
	Rev   int64
	VMs   map[string]VM
	Stale bool
}

// VMGen is one VM of a batch with the generation its owner holds now.
type VMGen struct {
	ID         string
	Generation uint64
}

// Batch is one migration batch: VMs owned by From moving to To.
type Batch struct {
	TxID     string // the migration's transaction ID (the ledger's)
	From, To string
	VMs      []VMGen
}

// Bump is a fencing takeover of one VM.
type Bump struct {
	VM string
	// Expect is the record as the caller read it; nil means the VM must be
	// absent from the registry (a restore onto an empty or older registry).
	Expect *VM
	// Owner is the new owner (enrolled, not fenced).
	Owner string
	// Generation is the new generation: above Expect's and at most
	// MaxGeneration. Callers pass one above every generation they know of
	// (the registry's, the hosts' local high-water marks, the bundle's).
	Generation uint64
	// OwnerNotLive also requires Expect.Owner's liveness lease to be gone
	// (failover: a standby takes over only from a dead owner).
	OwnerNotLive bool
}
