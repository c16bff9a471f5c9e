package migrate

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"regexp"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/internal/ids"
	"github.com/vtpmm/vtpmm/internal/strictjson"
	"github.com/vtpmm/vtpmm/migrate/registry"
)

// A restore from escrow (docs/escrow.md, docs/recovery.md) releases VM
// keys that k custodians rebuilt in the operator's vtpmctl to an attested
// destination, exactly as a migration does: vtpmctl asks its local vtpmd
// to attest the destination (AttestDest: the source's evidence check),
// wraps one transfer key for the destination's certified MK and each VM
// key under it (SealBatch), and the local vtpmd relays the batch, with
// each VM's vTPM state, to the destination (RelayRestore, agent wire
// method Restore; the relay never sees a plaintext key). The destination
// (Restore) authorises it with the per-VM rules of a Prepare (owned-here,
// runs-here, generation) and, with a registry, the restore's own rule:
// the registry shows the operator's transaction open to this host at the
// generation below the one offered. It then does what a Prepare does
// (Import, Load, Unseal, Flush once per batch; keys PENDING; secrets
// defined; proofs) and stages the states. The operator's registry Commit
// and a relayed Finish make the keys active and put the states in place.

// RestoreRequest is a Prepare for keys restored from escrow bundles, with
// the VMs' vTPM states (encrypted under their keys).
type RestoreRequest struct {
	Prepare PrepareRequest  `json:"prepare"`
	States  []RestoredState `json:"states"`
}

// RestoredState is one VM's vTPM state from its bundle.
type RestoredState struct {
	UUID   string `json:"uuid"`
	Bundle string `json:"bundle"` // the escrow bundle's ID, for the audit log
	SHA256 []byte `json:"sha256"` // of Blob
	Blob   []byte `json:"blob"`
}

// Restorer is a peer that accepts restores (the Node; the agent wire's
// remote peers).
type Restorer interface {
	Restore(ctx context.Context, req *RestoreRequest) (*PrepareResponse, error)
}

var _ Restorer = (*Node)(nil)

// RestoredStates stages a restore's vTPM states on the destination and
// puts them in place at the commit (the daemon: the hypervisor's vTPM
// state directory). Place and Drop of a VM with nothing staged do nothing.
type RestoredStates interface {
	Stage(ctx context.Context, txID, vm string, blob []byte) error
	Place(ctx context.Context, txID, vm string) error
	Drop(ctx context.Context, txID, vm string) error
}

// RuleRestore names the registry rule of a restore.
const RuleRestore = "restore"

// maxRestoreMessage bounds a decoded RestoreRequest (states included).
const maxRestoreMessage = 6 << 20

var bundleIDRE = regexp.MustCompile(`^[0-9a-f]{32}$`)

// DecodeRestore decodes and validates a RestoreRequest (untrusted input).
func DecodeRestore(b []byte) (*RestoreRequest, error) {
	var r RestoreRequest
	if err := strictjson.Decode(b, &r, maxRestoreMessage); err != nil {
		return nil, fmt.Errorf("decode restore: %w: %v", ErrBadMessage, err)
	}
	if err := r.validate(); err != nil {
		return nil, fmt.Errorf("decode restore: %w", err)
	}
	return &r, nil
}

func (r *RestoreRequest) validate() error {
	if err := r.Prepare.validate(); err != nil {
		return err
	}
	if len(r.States) != len(r.Prepare.VMs) {
		return fmt.Errorf("%w: %d states for %d VMs", ErrBadMessage, len(r.States), len(r.Prepare.VMs))
	}
	for i, st := range r.States {
		sum := sha256.Sum256(st.Blob)
		switch {
		case st.UUID != r.Prepare.VMs[i].UUID || !ids.IsUUID(st.UUID):
			return fmt.Errorf("%w: state %d is of VM %q, not %s", ErrBadMessage, i, st.UUID, r.Prepare.VMs[i].UUID)
		case !bundleIDRE.MatchString(st.Bundle):
			return fmt.Errorf("%w: VM %s: bundle id %q", ErrBadMessage, st.UUID, st.Bundle)
		case len(st.Blob) == 0 || !bytes.Equal(sum[:], st.SHA256):
			return fmt.Errorf("%w: VM %s: the state's SHA-256 differs from the one sent (%d bytes)", ErrBadMessage, st.UUID, len(st.Blob))
		}
	}
	return nil
}

// AttestDest attests dest for a restore with this host's policy, exactly
// as a migration source does (fresh evidence, or evidence verified less
// than EvidenceMaxAge ago): it returns dest's certified migration key, the
// digest of the evidence, and whether that evidence was reused.
func (n *Node) AttestDest(ctx context.Context, dest string) (mkPublic, evidenceDigest []byte, warm bool, err error) {
	if !ids.IsHostID(dest) {
		return nil, nil, false, fmt.Errorf("attest %q: %w: host id", dest, ErrBadMessage)
	}
	peer, err := n.cfg.Dial(ctx, dest)
	if err != nil {
		return nil, nil, false, fmt.Errorf("attest %s: %w: %w", dest, ErrPeer, err)
	}
	v, warm, err := n.destEvidence(ctx, peer, dest, &Result{})
	if err != nil {
		if re, ok := asRefusal(err); ok && n.cfg.Metrics != nil {
			n.cfg.Metrics.AttestationRefused(string(re.Rule))
		}
		return nil, nil, false, err
	}
	return v.mkPublic, v.digest, warm, nil
}

// RelayRestore sends a restore, as this host, to its destination (this
// host itself included) and returns the destination's answer. The keys
// travel wrapped for the destination's TPM: this host cannot open them.
func (n *Node) RelayRestore(ctx context.Context, req *RestoreRequest) (*PrepareResponse, error) {
	req.Prepare.Source = n.cfg.Host
	if err := req.validate(); err != nil {
		return nil, fmt.Errorf("relay restore: %w", err)
	}
	if req.Prepare.Dest == n.cfg.Host {
		return n.Restore(ctx, req)
	}
	peer, err := n.cfg.Dial(ctx, req.Prepare.Dest)
	if err != nil {
		return nil, fmt.Errorf("relay restore to %s: %w: %w", req.Prepare.Dest, ErrPeer, err)
	}
	r, ok := peer.(Restorer)
	if !ok {
		return nil, fmt.Errorf("relay restore to %s: the agent wire cannot carry restores", req.Prepare.Dest)
	}
	return r.Restore(ctx, req)
}

// RelayFinish sends a restore's Finish, as this host, to dest.
func (n *Node) RelayFinish(ctx context.Context, dest string, req *FinishRequest) (*FinishResponse, error) {
	req.Source = n.cfg.Host
	if dest == n.cfg.Host {
		return n.Finish(ctx, req)
	}
	peer, err := n.cfg.Dial(ctx, dest)
	if err != nil {
		return nil, fmt.Errorf("relay finish to %s: %w: %w", dest, ErrPeer, err)
	}
	return peer.Finish(ctx, req)
}

// Restore is the destination side of a restore: the rules (authorizeRestore,
// before anything is written), then a Prepare's work with the states
// staged. Finish (from the relaying host) commits it once the registry
// shows this host as the owner.
func (n *Node) Restore(ctx context.Context, req *RestoreRequest) (*PrepareResponse, error) {
	if err := req.validate(); err != nil {
		return nil, fmt.Errorf("restore: %w", err)
	}
	if req.Prepare.Dest != n.cfg.Host {
		return nil, fmt.Errorf("restore: %w: addressed to %s, this is %s", ErrBadMessage, req.Prepare.Dest, n.cfg.Host)
	}
	if n.cfg.States == nil {
		return nil, fmt.Errorf("restore on %s: %w: this host keeps no vTPM states for restores", n.cfg.Host, ErrRefused)
	}
	if err := n.authorizeRestore(ctx, &req.Prepare); err != nil {
		n.log.WithError(err).WithFields(logrus.Fields{"tx": req.Prepare.TxID, "relay": req.Prepare.Source}).Warn("restore refused")
		return nil, err
	}
	return n.accept(ctx, &req.Prepare, req.States)
}

// authorizeRestore: an enrolled relay; a fresh transaction; per VM the
// rules of a Prepare (generation bounds, owned-here, runs-here, the
// high-water step without a registry); with a registry, rule restore: the
// registry shows the operator's transaction open to this host and the
// generation offered is exactly the next one (its owner is whoever the
// operator replaces: a dead, retired or fenced host).
func (n *Node) authorizeRestore(ctx context.Context, req *PrepareRequest) error {
	const call = "restore"
	if err := n.authorizePeer(ctx, call, req.Source); err != nil {
		return err
	}
	if _, err := n.cfg.Ledger.Get(req.TxID); err == nil {
		return fmt.Errorf("restore %s: %w: transaction id already used on this host", req.TxID, ErrReplay)
	}
	for _, w := range req.VMs {
		if err := n.authorizeVM(ctx, call, req.Source, w); err != nil {
			return err
		}
	}
	if n.cfg.Registry == nil {
		return nil
	}
	vms := make([]string, len(req.VMs))
	for i, w := range req.VMs {
		vms[i] = w.UUID
	}
	check := func(v registry.View) error {
		for _, w := range req.VMs {
			rec, ok := v.VMs[w.UUID]
			switch {
			case !ok:
				return deny(call, req.Source, w.UUID, RuleRestore, "the registry has no record of the VM")
			case rec.Tx == nil || rec.Tx.ID != req.TxID || rec.Tx.To != n.cfg.Host:
				open := "none"
				if rec.Tx != nil {
					open = rec.Tx.String()
				}
				return deny(call, req.Source, w.UUID, RuleRestore, "the registry shows no restore %s to %s open for the VM (open: %s)", req.TxID, n.cfg.Host, open)
			case rec.Generation+1 != w.Generation:
				return deny(call, req.Source, w.UUID, RuleRestore, "generation %d offered, the registry shows generation %d (the next is %d)", w.Generation, rec.Generation, rec.Generation+1)
			}
		}
		return nil
	}
	if err := check(n.cfg.Registry.Cached(vms...)); err == nil {
		return nil
	}
	v, err := n.cfg.Registry.VMs(ctx, vms...)
	if err != nil {
		return fmt.Errorf("restore from %s: read the registry: %w", req.Source, err)
	}
	return check(v)
}

// stageState hands a restored state to the States store.
func (n *Node) stageState(ctx context.Context, txID string, st RestoredState) error {
	if n.cfg.States == nil {
		return errors.New("no store for restored states")
	}
	return n.cfg.States.Stage(ctx, txID, st.UUID, st.Blob)
}

// placeState puts a restore's staged state in place (a no-op for a
// migration: nothing was staged).
func (n *Node) placeState(ctx context.Context, txID, vm string) error {
	if n.cfg.States == nil {
		return nil
	}
	return n.cfg.States.Place(ctx, txID, vm)
}
