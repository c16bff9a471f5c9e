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
// must be migrating each of them away right now, and an earlier pulled
// transaction of the same VMs is settled first.
func (n *Node) pullPrecheck(ctx context.Context, req *PullRequest) error {
	jobs, ok := n.cfg.Hypervisor.(MigrationJobs)
	if !ok {
		return fmt.Errorf("pull: %w: hypervisor %s cannot report migrations", ErrNotMigrating, n.cfg.Hypervisor.Name())
	}
	for _, id := range req.VMs {
		out, err := jobs.MigratingOut(ctx, id)
		if err != nil {
			return fmt.Errorf("pull %s: %w", id, err)
		}
		if !out {
			return fmt.Errorf("pull %s for %s: %w: no outgoing migration job on %s", id, req.Dest, ErrNotMigrating, n.cfg.Host)
		}
	}
	n.recoverMu.Lock() // not while the recovery loop settles the same transaction
	defer n.recoverMu.Unlock()
	return n.settleStalePulls(ctx, req.VMs)
}

// settleStalePulls resolves an earlier pulled transaction of the same VMs
// before a new one: a new outgoing job means the hypervisor has finished
// the previous one, so the VM's fate is known.
func (n *Node) settleStalePulls(ctx context.Context, vms []string) error {
	for _, id := range vms {
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
		if err := n.recoverSource(ctx, tx); err != nil {
			return fmt.Errorf("pull %s: %w: earlier transaction %s: %w", id, ErrBusy, txID, err)
		}
	}
	return nil
}

// leased reports whether Reconcile must leave a pulled transaction alone:
// the hypervisor still migrates one of its VMs, or the lease has not run
// out and the VMs still run here (libvirt has not started copying yet).
func (n *Node) leased(ctx context.Context, tx Tx) bool {
	if !tx.Pulled || tx.Role != RoleSource || tx.State != SrcPrepared {
		return false
	}
	jobs, _ := n.cfg.Hypervisor.(MigrationJobs)
	inLease := n.cfg.Now().Before(tx.Lease)
	for _, vm := range tx.VMs {
		if jobs != nil {
			if out, err := jobs.MigratingOut(ctx, vm.UUID); err != nil || out {
				return true // ask again later rather than race the hypervisor
			}
		}
		if here, err := n.runsHere(ctx, vm.UUID); inLease && (err != nil || here) {
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
// Prepare came before the hypervisor's migration) need no pull; if all
// are, RequestPull answers with that transaction at once.
func (n *Node) RequestPull(ctx context.Context, vms []string, peers []string) (*PullResponse, error) {
	var missing []string
	var pending Tx
	for _, id := range vms {
		if tx, ok := n.Incoming(id); ok {
			pending = tx
			continue
		}
		missing = append(missing, id)
	}
	if len(missing) == 0 && len(vms) > 0 {
		return &PullResponse{TxID: pending.ID, Owner: pending.Peer, VMs: vms}, nil
	}
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
