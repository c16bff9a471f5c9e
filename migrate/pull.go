package migrate

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"sync"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/internal/ids"
	"github.com/vtpmm/vtpmm/vtpm"
)

// Hook mode. A plain hypervisor migration (virsh migrate --live --p2p)
// is not started by vtpmm, so the keys move the other way round: libvirt
// runs the destination's qemu hook at "migrate begin", before the
// destination reads the vTPM secret; the hook asks the local node to
// RequestPull, which asks the VM's owner to Pull. The owner checks that its
// hypervisor really is migrating the VM away, then runs the first half of
// a migration to the asking host (attest, wrap, Prepare with key proofs)
// and answers. The transaction stays SrcPrepared, marked Pulled: the
// hypervisor finishes the migration, and Settle (nudged by the source's
// "release end" hook or a libvirt lifecycle event) or the recovery loop
// commits it once the VM runs on the destination, or aborts it if the VM
// still runs here and no migration job is left.

// PullRequest asks a VM's owner to release the VMs' keys to Dest, because
// the owner's hypervisor is migrating them there.
type PullRequest struct {
	Version int      `json:"version"`
	Dest    string   `json:"dest"` // the asking host (must be the caller)
	VMs     []string `json:"vms"`
	// Tx, when set, asks only for a confirmation (incoming.go): the VMs'
	// keys are PENDING at Dest under this transaction; does the owner's
	// hypervisor migrate them to Dest for it right now? Nothing is released.
	Tx string `json:"tx,omitempty"`
}

// PullResponse reports a Pull: the keys are PENDING on the destination and
// its secrets are defined.
type PullResponse struct {
	TxID  string   `json:"tx"`
	Owner string   `json:"owner"`
	VMs   []string `json:"vms"`
	Warm  bool     `json:"warm,omitempty"`
}

// DecodePull decodes and validates a PullRequest (untrusted input).
func DecodePull(b []byte) (*PullRequest, error) {
	var r PullRequest
	if err := decodeStrict(b, &r); err != nil {
		return nil, fmt.Errorf("decode pull: %w", err)
	}
	if err := r.validate(); err != nil {
		return nil, fmt.Errorf("decode pull: %w", err)
	}
	return &r, nil
}

func (r *PullRequest) validate() error {
	switch {
	case r.Version != ProtocolVersion:
		return fmt.Errorf("%w: protocol version %d (this host speaks %d)", ErrBadMessage, r.Version, ProtocolVersion)
	case !ids.IsHostID(r.Dest):
		return fmt.Errorf("%w: host id %q", ErrBadMessage, r.Dest)
	case len(r.VMs) == 0 || len(r.VMs) > 4096:
		return fmt.Errorf("%w: %d VMs in one pull (1..4096)", ErrBadMessage, len(r.VMs))
	case r.Tx != "" && !txIDRE.MatchString(r.Tx):
		return fmt.Errorf("%w: transaction id %q", ErrBadMessage, r.Tx)
	}
	seen := map[string]bool{}
	for _, id := range r.VMs {
		if !ids.IsUUID(id) || seen[id] {
			return fmt.Errorf("%w: VM id %q (malformed or repeated)", ErrBadMessage, id)
		}
		seen[id] = true
	}
	return nil
}

// Pull releases the VMs' keys to req.Dest for a migration the hypervisor
// is running (hook mode). Refusals: ErrNotOwner (no active key here),
// ErrNotMigrating (the hypervisor is not migrating the VM away, or cannot
// tell), ErrRefused (req.Dest fails attestation), ErrBusy.
func (n *Node) Pull(ctx context.Context, req *PullRequest) (*PullResponse, error) {
	if err := req.validate(); err != nil {
		return nil, fmt.Errorf("pull: %w", err)
	}
	if req.Dest == n.cfg.Host {
		return nil, fmt.Errorf("pull: %w: %s asks itself", ErrBadMessage, req.Dest)
	}
	if err := n.authorizePeer(ctx, "pull", req.Dest); err != nil {
		return nil, err
	}
	if req.Tx != "" {
		return n.confirmPull(ctx, req)
	}
	txID, err := newTxID(n.cfg.Rand)
	if err != nil {
		return nil, err
	}
	keys := make(map[string]vtpm.VMKey, len(req.VMs))
	defer destroyKeys(keys)
	defer n.drive(txID)()
	res := &Result{TxID: txID}
	spec := releaseSpec{txID: txID, vms: req.VMs, dest: req.Dest, pulled: true,
		precheck: func(ctx context.Context) error { return n.pullPrecheck(ctx, req) }}
	if _, _, err := n.release(ctx, spec, keys, func(Phase, string) {}, res); err != nil {
		return nil, fmt.Errorf("pull: %w", err)
	}
	n.log.WithFields(logrus.Fields{"tx": txID, "dest": req.Dest, "vms": len(req.VMs), "warm": res.Warm}).Info("keys released for a hypervisor migration")
	return &PullResponse{TxID: txID, Owner: n.cfg.Host, VMs: req.VMs, Warm: res.Warm}, nil
}

// pullPrecheck runs once this node owns every VM of req: the hypervisor
// must be migrating each of them away right now, to the caller where the
// hypervisor names the job's destination, and an earlier pulled
// transaction of the same VMs is settled first if its job is over; while
// it runs, the second pull is refused and the first left alone.
func (n *Node) pullPrecheck(ctx context.Context, req *PullRequest) error {
	jobs := map[string]hypervisor.OutgoingJob{}
	for _, id := range req.VMs {
		job, err := n.outgoingJob(ctx, id)
		if err != nil {
			return fmt.Errorf("pull %s: %w", id, err)
		}
		if !job.Active {
			return fmt.Errorf("pull %s for %s: %w: no outgoing migration job on %s", id, req.Dest, ErrNotMigrating, n.cfg.Host)
		}
		if job.Dest != "" && job.Dest != req.Dest {
			return fmt.Errorf("pull %s for %s: %w: the hypervisor on %s migrates it to %s, not to %s", id, req.Dest, ErrNotMigrating, n.cfg.Host, job.Dest, req.Dest)
		}
		jobs[id] = job
	}
	n.recoverMu.Lock() // not while the recovery loop settles the same transaction
	defer n.recoverMu.Unlock()
	return n.settleStalePulls(ctx, req, jobs)
}

// outgoingJob asks the hypervisor about the VM's outgoing job, with the
// detail it can give (OutgoingJobs), or whether there is one
// (MigrationJobs).
func (n *Node) outgoingJob(ctx context.Context, vm string) (hypervisor.OutgoingJob, error) {
	if j, ok := n.cfg.Hypervisor.(OutgoingJobs); ok {
		return j.OutgoingJob(ctx, vm)
	}
	j, ok := n.cfg.Hypervisor.(MigrationJobs)
	if !ok {
		return hypervisor.OutgoingJob{}, fmt.Errorf("%w: hypervisor %s cannot report migrations", ErrNotMigrating, n.cfg.Hypervisor.Name())
	}
	out, err := j.MigratingOut(ctx, vm)
	return hypervisor.OutgoingJob{Active: out}, err
}

// settleStalePulls resolves an earlier pulled transaction of the same VMs
// before a new one, once the hypervisor shows that its job is over: the
// current job goes to another host than the earlier pull's, or started
// after it. Otherwise (the job is the earlier pull's, or the hypervisor
// cannot tell) the new pull is refused (ErrBusy) and the earlier one is
// left alone: one destination per job.
func (n *Node) settleStalePulls(ctx context.Context, req *PullRequest, jobs map[string]hypervisor.OutgoingJob) error {
	for _, id := range req.VMs {
		txID, err := n.cfg.Ledger.Holder(id)
		if errors.Is(err, errNoHolder) {
			continue
		} else if err != nil {
			return fmt.Errorf("pull %s: %w", id, err)
		}
		tx, err := n.cfg.Ledger.Get(txID)
		if err != nil || !tx.Pulled || tx.Role != RoleSource || n.driving(txID) {
			return fmt.Errorf("pull %s: %w: transaction %s is open", id, ErrBusy, txID)
		}
		job := jobs[id]
		over := (job.Dest != "" && job.Dest != tx.Peer) || (!job.Started.IsZero() && job.Started.After(tx.Created))
		if !over {
			return fmt.Errorf("pull %s for %s: %w: the VM's outgoing job belongs to transaction %s, pulled by %s; one destination per job",
				id, req.Dest, ErrBusy, txID, tx.Peer)
		}
		if err := n.recoverSource(ctx, tx); err != nil {
			return fmt.Errorf("pull %s: %w: earlier transaction %s: %w", id, ErrBusy, txID, err)
		}
	}
	return nil
}

// leased reports whether Reconcile must leave a source transaction alone:
// the hypervisor still migrates one of its VMs (any open source
// transaction, pulled or not: after a vtpmd crash the hypervisor's job may
// outlive the Migrate that started it, and an abort now would drop the
// key the destination's paused VM is about to run on; model F6), or, for
// a pulled one, the lease has not run out and the VMs still run here
// (libvirt has not started copying yet).
func (n *Node) leased(ctx context.Context, tx Tx) bool {
	if tx.Role != RoleSource || tx.State.Final() {
		return false
	}
	jobs, _ := n.cfg.Hypervisor.(MigrationJobs)
	inLease := tx.Pulled && tx.State == SrcPrepared && n.cfg.Now().Before(tx.Lease)
	for _, vm := range tx.VMs {
		if jobs != nil {
			if out, err := jobs.MigratingOut(ctx, vm.UUID); err != nil || out {
				return true // ask again later rather than race the hypervisor
			}
		}
		if !inLease {
			continue
		}
		if here, err := n.runsHere(ctx, vm.UUID); err != nil || here {
			return true
		}
	}
	return false
}

// Settle reconciles the VM's open transaction now, if there is one that no
// live Migrate drives and no pull lease holds (hook mode's "release end",
// lifecycle events). One recovery runs at a time, so a second trigger
// finds the transaction closed and does nothing.
func (n *Node) Settle(ctx context.Context, vmUUID string) error {
	n.recoverMu.Lock()
	defer n.recoverMu.Unlock()
	txID, err := n.cfg.Ledger.Holder(vmUUID)
	if errors.Is(err, errNoHolder) {
		return nil
	} else if err != nil {
		return err
	}
	tx, err := n.cfg.Ledger.Get(txID)
	if err != nil {
		return err
	}
	if n.driving(txID) || n.leased(ctx, tx) {
		return nil
	}
	if tx.Role == RoleSource {
		return n.recoverSource(ctx, tx)
	}
	return n.recoverDest(ctx, tx)
}

// RequestPull asks the peers, concurrently, to release the VMs' keys to
// this host (hook mode, destination side). The owner answers; the others
// say ErrNotOwner. If no peer released them, the error names each peer's
// answer, the owner's refusal (e.g. the attestation rule) first.
//
// VMs whose keys are already PENDING here (a migration vtpmm drives, whose
// Prepare came before the hypervisor's migration) need no pull, if their
// transaction's source confirms that its hypervisor migrates them here for
// that transaction now (a PENDING key serves only the job its transaction
// started); otherwise the stale transaction is settled first, and the key
// pulled afresh, or the pull refused while it stays open. On success the
// VMs are marked for the "prepare begin" that follows (AdmitIncoming).
func (n *Node) RequestPull(ctx context.Context, vms []string, peers []string) (*PullResponse, error) {
	missing, pending, err := n.pendingForJob(ctx, vms)
	if err != nil {
		return nil, fmt.Errorf("request pull: %w", err)
	}
	if len(missing) == 0 && len(vms) > 0 {
		tx := pending[vms[0]]
		n.arm(pending)
		return &PullResponse{TxID: tx.ID, Owner: tx.Peer, VMs: vms}, nil
	}
	resp, err := n.requestPull(ctx, missing, peers)
	if err != nil {
		return nil, err
	}
	for _, id := range missing {
		pending[id] = Tx{ID: resp.TxID, Peer: resp.Owner}
	}
	n.arm(pending)
	return resp, nil
}

// requestPull asks the peers to release the missing VMs' keys (Pull).
func (n *Node) requestPull(ctx context.Context, missing []string, peers []string) (*PullResponse, error) {
	req := &PullRequest{Version: ProtocolVersion, Dest: n.cfg.Host, VMs: missing}
	if err := req.validate(); err != nil {
		return nil, fmt.Errorf("request pull: %w", err)
	}
	type answer struct {
		host string
		resp *PullResponse
		err  error
	}
	var (
		wg  sync.WaitGroup
		mu  sync.Mutex
		ans []answer
	)
	for _, h := range peers {
		if h == n.cfg.Host {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			a := answer{host: h}
			p, err := n.cfg.Dial(ctx, h)
			if err == nil {
				a.resp, err = p.Pull(ctx, req)
			}
			a.err = err
			mu.Lock()
			ans = append(ans, a)
			mu.Unlock()
		}()
	}
	wg.Wait()
	sort.Slice(ans, func(i, j int) bool { return ans[i].host < ans[j].host })
	var owners, others []error
	for _, a := range ans {
		switch {
		case a.err == nil:
			return a.resp, nil
		case errors.Is(a.err, ErrNotOwner):
		case errors.Is(a.err, ErrPeer) && !errors.Is(a.err, ErrRefused) && !errors.Is(a.err, ErrNotMigrating):
			others = append(others, fmt.Errorf("%s: %w", a.host, a.err))
		default:
			owners = append(owners, a.err)
		}
	}
	if len(owners) > 0 {
		return nil, errors.Join(append(owners, others...)...)
	}
	asked := make([]string, 0, len(ans))
	for _, a := range ans {
		asked = append(asked, a.host)
	}
	slices.Sort(asked)
	err := fmt.Errorf("request pull of %s: %w: none of the peers [%s] owns it", strings.Join(missing, ", "), ErrNotOwner, strings.Join(asked, " "))
	if len(others) > 0 {
		return nil, errors.Join(append([]error{err}, others...)...)
	}
	return nil, err
}
