package migrate

import (
	"context"
	"crypto/rand"
	"io"
	"sync"
	"time"

	"github.com/google/go-tpm/tpm2/transport"
	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/attest"
	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/identity"
)

// Peer is another host's agent, as the source sees it. Warm migrations use
// Prepare before the hypervisor migrates and Finish after it; cold ones add
// Evidence first. Status serves recovery; Identity and Activate serve
// enrolment.
type Peer interface {
	Evidence(ctx context.Context, req *EvidenceRequest) (*EvidenceResponse, error)
	Prepare(ctx context.Context, req *PrepareRequest) (*PrepareResponse, error)
	Finish(ctx context.Context, req *FinishRequest) (*FinishResponse, error)
	Status(ctx context.Context, req *StatusRequest) (*StatusResponse, error)
	// Identity and Activate serve enrolment (Node.Enroll).
	Identity(ctx context.Context, req *IdentityRequest) (*IdentityResponse, error)
	Activate(ctx context.Context, req *ActivateRequest) (*ActivateResponse, error)
	// Pull serves hook mode: a destination asks the VMs' owner to release
	// their keys to it because the owner's hypervisor is migrating them.
	Pull(ctx context.Context, req *PullRequest) (*PullResponse, error)
}

// MigrationJobs is implemented by hypervisors that can tell whether a VM
// is being migrated away from this host right now (libvirt: the domain's
// job is an outgoing migration). Pull requires it; Reconcile uses it to
// leave pulled transactions alone while the hypervisor migrates.
type MigrationJobs interface {
	MigratingOut(ctx context.Context, vmUUID string) (bool, error)
}

// OutgoingJobs is implemented by hypervisors that tell more about an
// outgoing job than MigratingOut: when it started, and where it goes (the
// fake hypervisor both, libvirt the start). Pull uses it to bind a pull to
// the job: the caller must be the job's destination, and a second pull
// during one job is refused without disturbing the first.
type OutgoingJobs interface {
	OutgoingJob(ctx context.Context, vmUUID string) (hypervisor.OutgoingJob, error)
}

var _ Peer = (*Node)(nil)

// Dialer returns the Peer for a host name.
type Dialer func(ctx context.Context, host string) (Peer, error)

// Keys is the key store as migrate uses it (vtpm.KeyStore implements it).
type Keys interface {
	Get(ctx context.Context, vmID string) (vtpm.VMKey, uint64, error)
	Delete(ctx context.Context, vmID string) error
	PutPending(ctx context.Context, vmID, txID string, gen uint64, k vtpm.VMKey) error
	GetPending(ctx context.Context, vmID, txID string) (vtpm.VMKey, uint64, error)
	WithPassphrase(ctx context.Context, vmID string, fn func(pass []byte) error) (uint64, error)
	// HighWater is the highest generation this host has held for the VM.
	HighWater(ctx context.Context, vmID string) (uint64, error)
	CommitPending(ctx context.Context, vmID, txID string) (uint64, error)
	DropPending(ctx context.Context, vmID, txID string) error
	// List returns the active keys and their generations without opening them.
	List(ctx context.Context) ([]vtpm.KeyInfo, error)
}

var _ Keys = (*vtpm.KeyStore)(nil)

// Anchor is the host's rollback anchor as the migration engine uses it
// (vtpm/host.Host through the daemon; docs/anchor.md): Advance counts an
// ownership step in the host TPM (one NV_Increment) before the key store
// changes, Settle records the key store's outcome (and the audit log's
// position) after. nil: no anchor (tests of the protocol alone).
type Anchor interface {
	Advance(ctx context.Context, changes []vtpm.Change) (vtpm.AnchorTicket, error)
	Settle(ctx context.Context, t vtpm.AnchorTicket) error
}

// Auditor records AuditEvents (internal/audit adapts to it).
type Auditor interface {
	Audit(ctx context.Context, e AuditEvent) error
}

// Observer receives metrics; nil means none.
type Observer interface {
	MigrationDone(result string)
	ObservePhase(phase string, d time.Duration)
	AttestationRefused(rule string)
}

// Config is everything a Node needs; nothing is global.
type Config struct {
	Host       string
	Keys       Keys
	TPM        transport.TPM      // this host's TPM (destination: unwrap and evidence)
	Identity   *identity.Identity // loaded once (LoadIdentity)
	Hypervisor hypervisor.Hypervisor
	Ledger     *Ledger
	// Registry is the fleet registry (nil: registry mode none). See Registry.
	Registry Registry
	// Anchor is the host's rollback anchor (nil: none). The source's Begin
	// and the destination's commit each advance it once per batch.
	Anchor   Anchor
	Verifier *attest.Verifier // verifies destinations (source side)
	// Enrollments is the store of enrolled hosts: this host answers
	// Prepare, Finish, Evidence, Status and Pull from enrolled hosts only
	// (authz.go; it must implement attest.HostFinder). nil trusts no peer.
	Enrollments attest.Enrollments
	QuotePCRs   map[attest.Bank][]int
	EventLog    []byte // this host's TCG event log, sent with evidence
	Dial        Dialer
	// Target maps a destination host to its hypervisor target.
	Target func(host string) (hypervisor.Target, error)
	// EvidenceMaxAge: verified evidence of a destination is reused for
	// further migrations to it while younger than this (default 60 s; 0
	// keeps the default, a negative value disables reuse).
	EvidenceMaxAge time.Duration
	// PullLease is how long after a Pull Reconcile leaves the transaction
	// alone even if the hypervisor reports no migration job yet (default
	// DefaultPullLease). While a job runs it is left alone regardless.
	PullLease time.Duration
	// States stages and places the vTPM states a restore from escrow
	// brings (nil: this host accepts no restore).
	States RestoredStates
	// Replicas is where this host keeps standby replicas (nil: it takes
	// none; standby.go).
	Replicas *ReplicaStore
	// Fence is the fence agent (nil: none): recovery fences a migration's
	// gone destination with it (F12, failover.go).
	Fence FenceFunc
	// Registered, when set (vtpmd with a fleet registry), returns nil once
	// this host's liveness key is in the registry (its first registration
	// since it started), waiting a bounded time. CheckStart calls it
	// before it reads the fence record: a host that comes back between a
	// standby's fence agent and its fence record then either sees the
	// record or is seen live by the standby, which fences it once more
	// (failover.go, fenceHost). Without it, a vtpmd that had not yet
	// registered started the VM unseen (TestSoakFailover in CI: the VM ran
	// on two hosts).
	Registered func(ctx context.Context) error
	Crash      CrashHook
	Audit      Auditor
	Metrics    Observer
	Now        func() time.Time
	Rand       io.Reader
	Log        logrus.FieldLogger
}

// DefaultEvidenceMaxAge is how long verified evidence is reused.
const DefaultEvidenceMaxAge = 60 * time.Second

// DefaultPullLease is the default Config.PullLease.
const DefaultPullLease = 30 * time.Second

// Node is one host's migration engine.
type Node struct {
	cfg   Config
	log   logrus.FieldLogger
	tpmMu sync.Mutex // one multi-command TPM sequence at a time

	cacheMu sync.Mutex
	cache   map[string]verified // destination host -> fresh verified evidence

	activeMu sync.Mutex
	active   map[string]bool // transactions this node is driving right now

	// recoverMu runs one recovery at a time (Reconcile, Settle): the
	// recovery loop, a hook and a lifecycle event may all want to settle
	// the same transaction at the same moment.
	recoverMu sync.Mutex
	// finishing holds a *sync.Mutex per transaction being finished on
	// the destination: the source's Finish and recovery (a lifecycle
	// event, the loop) may finish one transaction at the same moment.
	finishing sync.Map

	// confirmed holds, per VM, the generation at which this node's start
	// rule last confirmed it with quorum (fence record included): only
	// those may start by the last view without quorum (F8).
	confirmed sync.Map

	armMu sync.Mutex
	armed map[string]incomingArm // VM -> the incoming migration whose "migrate begin" pulled its key (incoming.go)

	stepsMu sync.Mutex
	steps   map[string]vtpm.AnchorTicket // open source transaction -> its Begin step in the rollback anchor (anchor.go)
}

type verified struct {
	mkPublic []byte
	digest   []byte
	at       time.Time
	// ak is the AK name the evidence was verified under: the entry is
	// reused only while it is still the AK enrolled for the host (a host
	// re-enrolled with a new TPM invalidates it, rule identity-retired).
	ak []byte
}

// NewNode builds a Node.
func NewNode(cfg Config) *Node {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.Reader
	}
	if cfg.EvidenceMaxAge == 0 {
		cfg.EvidenceMaxAge = DefaultEvidenceMaxAge
	}
	if cfg.PullLease <= 0 {
		cfg.PullLease = DefaultPullLease
	}
	log := cfg.Log
	if log == nil {
		l := logrus.New()
		l.SetOutput(io.Discard)
		log = l
	}
	return &Node{cfg: cfg, log: log.WithField("host", cfg.Host), cache: map[string]verified{}, active: map[string]bool{},
		armed: map[string]incomingArm{}, steps: map[string]vtpm.AnchorTicket{}}
}

// Host returns the node's host name.
func (n *Node) Host() string { return n.cfg.Host }

func (n *Node) audit(ctx context.Context, e AuditEvent) {
	if n.cfg.Audit == nil {
		return
	}
	if err := n.cfg.Audit.Audit(ctx, e); err != nil {
		n.log.WithError(err).WithField("event", e.Event).Error("audit log append failed")
	}
}

func (n *Node) observe(phase string, start time.Time) {
	if n.cfg.Metrics != nil {
		n.cfg.Metrics.ObservePhase(phase, n.cfg.Now().Sub(start))
	}
}

func (n *Node) done(result Outcome) {
	if n.cfg.Metrics != nil {
		n.cfg.Metrics.MigrationDone(string(result))
	}
}

// drive marks a transaction as driven by this node until the returned
// func runs: Reconcile leaves it alone meanwhile (during a live migration
// the VM legitimately still runs on the source).
func (n *Node) drive(txID string) func() {
	n.activeMu.Lock()
	n.active[txID] = true
	n.activeMu.Unlock()
	return func() {
		n.activeMu.Lock()
		delete(n.active, txID)
		n.activeMu.Unlock()
	}
}

func (n *Node) driving(txID string) bool {
	n.activeMu.Lock()
	defer n.activeMu.Unlock()
	return n.active[txID]
}

// ForgetEvidence drops cached evidence of a destination (e.g. on reboot news).
func (n *Node) ForgetEvidence(host string) {
	n.cacheMu.Lock()
	delete(n.cache, host)
	n.cacheMu.Unlock()
}
