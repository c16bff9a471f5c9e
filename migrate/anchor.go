package migrate

import (
	"context"
	"fmt"

	"github.com/vtpmm/vtpmm/vtpm"
)

// The rollback anchor's steps in the migration engine (docs/anchor.md): the
// source's commit (completeSource) and the destination's (finishDest) each
// count their batch in the host TPM once, before the key store changes,
// and settle it after the key store changed and the step was audited. VM
// creation is the host's (vtpm/host.CreateVM).

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
	return func() {
		if err := n.cfg.Anchor.Settle(context.WithoutCancel(ctx), t); err != nil {
			n.log.WithError(err).WithField("tx", tx.ID).Error("rollback anchor: the step stays unsettled until the next start")
		}
	}, nil
}
