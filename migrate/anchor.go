package migrate

import (
	"context"
	"fmt"

	"github.com/vtpmm/vtpmm/vtpm"
)

// The rollback anchor's steps in the migration engine (docs/anchor.md):
//
//   - the source counts its batch once, when it opens the transaction
//     (beginStep, right after the ledger's Begin and before the registry's
//     or the destination hears of it): every VM of the batch may leave.
//     The step stays unsettled while the transaction is open and is
//     settled when it ends (settleStep: commit or abort), with no further
//     TPM command. A data directory restored from before an open
//     migration is then older than the TPM and refused at start, instead
//     of forgetting the migration (model finding F13, docs/model.md);
//   - the destination's commit (finishDest) counts its batch once, before
//     the pending keys become active, and settles after.
//
// So each side costs one NV_Increment per batch. A source transaction
// whose Begin step a restart settled (the new process has no ticket for
// it) advances again at its commit (completeSource), as recovery only.
// VM creation is the host's (vtpm/host.CreateVM).

// advance counts a batch's ownership step in the rollback anchor, before
// the key store changes, and returns the func that settles it (after the
// key store changed and the step was audited). No changes, or no anchor:
// nothing to count.
func (n *Node) advance(ctx context.Context, tx Tx, changes []vtpm.Change) (func(), error) {
	if n.cfg.Anchor == nil || len(changes) == 0 {
		return func() {}, nil
	}
	t, err := n.cfg.Anchor.Advance(ctx, changes)
	if err != nil {
		return nil, fmt.Errorf("transaction %s: rollback anchor: %w", tx.ID, err)
	}
	return func() { n.settleTicket(ctx, tx, t) }, nil
}

func (n *Node) settleTicket(ctx context.Context, tx Tx, t vtpm.AnchorTicket) {
	if err := n.cfg.Anchor.Settle(context.WithoutCancel(ctx), t); err != nil {
		n.log.WithError(err).WithField("tx", tx.ID).Error("rollback anchor: the step stays unsettled until the next start")
	}
}

// beginStep counts a source transaction that the ledger just opened: one
// NV_Increment for the batch, recording that each of its VMs may leave
// (generation 0 at the step's far end; the anchor accepts either end
// until the step settles). The ticket is kept until the transaction ends.
func (n *Node) beginStep(ctx context.Context, tx Tx) error {
	if n.cfg.Anchor == nil {
		return nil
	}
	changes := make([]vtpm.Change, 0, len(tx.VMs))
	for _, vm := range tx.VMs {
		changes = append(changes, vtpm.Change{VMID: vm.UUID})
	}
	t, err := n.cfg.Anchor.Advance(ctx, changes)
	if err != nil {
		return fmt.Errorf("transaction %s: rollback anchor: %w", tx.ID, err)
	}
	n.stepsMu.Lock()
	n.steps[tx.ID] = t
	n.stepsMu.Unlock()
	return nil
}

// takeStep returns (and forgets) the Begin step of a source transaction
// this process opened.
func (n *Node) takeStep(txID string) (vtpm.AnchorTicket, bool) {
	n.stepsMu.Lock()
	defer n.stepsMu.Unlock()
	t, ok := n.steps[txID]
	delete(n.steps, txID)
	return t, ok
}

// settleStep settles a source transaction's Begin step once the
// transaction ended with its keys in place (an abort): a file write, no
// TPM command.
func (n *Node) settleStep(ctx context.Context, tx Tx) {
	if t, ok := n.takeStep(tx.ID); ok {
		n.settleTicket(ctx, tx, t)
	}
}

// sourceStep is the anchor's step for a source's commit or abort
// (completeSource): the transaction's Begin step when this process opened
// it (no TPM command), or else a new one for the VMs that left (after a
// restart settled the Begin step: one NV_Increment).
func (n *Node) sourceStep(ctx context.Context, tx Tx, changes []vtpm.Change) (func(), error) {
	if t, ok := n.takeStep(tx.ID); ok {
		return func() { n.settleTicket(ctx, tx, t) }, nil
	}
	return n.advance(ctx, tx, changes)
}
