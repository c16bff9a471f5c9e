package evacuate

import (
	"context"
	"time"
)

// HostState is a host's state in the registry.
type HostState string

// Host states (issue #12): only an active host may be a migration target.
const (
	HostActive   HostState = "active"
	HostDraining HostState = "draining"
	HostFenced   HostState = "fenced"
)

// Host is a host as the registry knows it.
type Host struct {
	Name     string
	State    HostState
	Live     bool // its vtpmd holds its liveness lease
	Enrolled bool // the operator enrolled it (EK chain and activation checked once)
}

// VM is a vTPM VM defined on the source, as the source's hypervisor reports it.
type VM struct {
	ID      string // UUID
	Name    string
	Memory  uint64 // bytes the destination must have free for it
	Running bool
}

// VMRecord is a VM's truth in the registry: who owns its vTPM, at which
// generation, and which transaction holds it, if any.
type VMRecord struct {
	ID         string
	Owner      string
	Generation uint64
	// OpenTx is the transaction that holds the VM (claimed, in flight, or
	// left by a crash for recovery to settle); empty when none.
	OpenTx string
	// Revision is the record's revision (etcd: its mod_revision), the
	// compare of a Claim.
	Revision int64
}

// Fleet is the registry's view of the hosts.
type Fleet interface {
	// Hosts lists every host in the registry (one round trip).
	Hosts(ctx context.Context) ([]Host, error)
	// Drain marks host draining, so that no migration targets it until the
	// operator undrains it. It is idempotent on a draining host and fails
	// with ErrSourceFenced on a fenced one.
	Drain(ctx context.Context, host string) error
}

// Claim asks the registry to open transaction TxID on VMs moving from
// Source to Dest.
type Claim struct {
	TxID   string
	Source string
	Dest   string
	// Expect holds, per VM, the record revision the caller read. The claim
	// is one compare-and-swap over all of them (etcd: one Txn).
	Expect map[string]int64
}

// ClaimResult is the answer to a Claim, from the same round trip.
type ClaimResult struct {
	// OK reports that every VM was claimed (all or nothing).
	OK bool
	// Records are the VMs' records: after the claim when OK, as they are
	// now when not (the Txn's else branch reads them).
	Records map[string]VMRecord
}

// Ownership is the registry's VM records, as the evacuator uses them.
type Ownership interface {
	// VMs reads the records of ids in one round trip; ids the registry
	// does not know are absent from the map.
	VMs(ctx context.Context, ids []string) (map[string]VMRecord, error)
	// Claim opens c.TxID on every VM of c.Expect if and only if each
	// record's revision still equals the one given, no transaction holds
	// it, and c.Dest is active (else ErrHostNotActive). One round trip.
	Claim(ctx context.Context, c Claim) (ClaimResult, error)
}

// Records stores one evacuation record per source host, with
// compare-and-swap on its revision, and tells whether the registry session
// of the process that holds a record is still alive.
type Records interface {
	// LoadEvacuation returns the record and its revision (ErrNotFound when none).
	LoadEvacuation(ctx context.Context, source string) ([]byte, int64, error)
	// SaveEvacuation writes the record if its revision is still rev (0:
	// only if there is none), returning the new revision; ErrConflict otherwise.
	SaveEvacuation(ctx context.Context, source string, data []byte, rev int64) (int64, error)
	// SessionAlive reports whether a registry session (etcd: a lease kept
	// alive by its process) is still alive.
	SessionAlive(ctx context.Context, session string) (bool, error)
}

// Inventory is the source host's hypervisor: the vTPM VMs defined there.
type Inventory interface {
	VMs(ctx context.Context) ([]VM, error)
}

// Capacity reports a host's free memory as its hypervisor sees it
// (libvirt: virNodeGetFreeMemory).
type Capacity interface {
	FreeMemory(ctx context.Context, host string) (uint64, error)
}

// Phase is a step of one VM's move, for progress.
type Phase string

// Phases, in order. Attest and Prepare are per batch and reported for
// every VM of the batch.
const (
	PhaseQueued  Phase = "queued"  // planned, waiting for its batch or a migration slot
	PhaseWait    Phase = "wait"    // an open transaction must be settled by recovery first
	PhaseAttest  Phase = "attest"  // the destination attests (or its fresh evidence is reused)
	PhasePrepare Phase = "prepare" // keys wrapped under the batch's transfer key and sent
	PhaseMigrate Phase = "migrate" // the hypervisor live-migrates (bytes move)
	PhaseCommit  Phase = "commit"  // ownership changes in the registry
)

// BatchVM is one VM of a batch, as claimed.
type BatchVM struct {
	ID         string
	Name       string
	Memory     uint64
	Generation uint64 // current generation (the move commits Generation+1)
}

// Batch is the VMs moving from Source to Dest under one transaction: one
// attestation (or fresh evidence) and one transfer key for all of them.
type Batch struct {
	TxID   string
	Source string
	Dest   string
	VMs    []BatchVM // sorted by ID
}

// Progress is one VM's progress inside a batch, reported by the Mover.
type Progress struct {
	VM      string
	Phase   Phase
	Bytes   uint64 // transferred so far (PhaseMigrate)
	Total   uint64 // to transfer, when known
	Elapsed time.Duration
}

// Outcome is how one VM's move ended.
type Outcome string

// Outcomes of a VM in a batch, and of the report.
const (
	OutcomeMoved      Outcome = "moved"       // committed: the destination owns it at Generation
	OutcomeFailed     Outcome = "failed"      // rolled back: it runs on RunsOn (the source) at its old generation
	OutcomeOpen       Outcome = "open"        // left open (crash, cut): recovery settles it
	OutcomeNotStarted Outcome = "not-started" // rolled back before its migration (refusal, stop, destination down)
)

// VMResult is the end of one VM's move.
type VMResult struct {
	Outcome    Outcome
	Generation uint64 // moved: the new generation
	RunsOn     string // failed, not-started: where the VM runs now
	Err        string // failed, open: why
	Bytes      uint64
	Elapsed    time.Duration
}

// BatchResult reports a batch.
type BatchResult struct {
	VMs map[string]VMResult
}

// Mover runs batches (migrate.Node in the source's vtpmd).
type Mover interface {
	// Attest verifies dest under the attestation policy, or finds its
	// verified evidence still fresh. A refusal wraps *attest.RefusalError.
	Attest(ctx context.Context, dest string) error
	// Move runs one batch: attest (reusing fresh evidence), one transfer
	// key for every VM, one Prepare, then the hypervisor's migrations, each
	// holding a slot from slots (at most slots.Size() at once across all
	// batches), then the commit of every VM that moved (group commit: one
	// registry transaction comparing each VM's owner, generation and claim)
	// and the release of every claim it does not commit. When ctx ends it
	// starts no further migration; the VMs that moved are still committed.
	//
	// It returns a result for every VM it can vouch for; a VM without one
	// is reported open. A non-nil error says why the batch as a whole
	// stopped: a refusal (wraps *attest.RefusalError: no key left the
	// source), ErrDestinationDown, or anything else.
	Move(ctx context.Context, b Batch, slots *Slots, progress func(Progress)) (BatchResult, error)
}
