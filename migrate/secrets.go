package migrate

import (
	"context"
	"errors"
	"fmt"

	"github.com/vtpmm/vtpmm/vtpm"
)

// A VM's vTPM secret (its key's passphrase, which libvirt hands to swtpm)
// has one owner on a host: its Node. The node defines it from a key it
// holds, a PENDING key when a destination prepares, the active key before
// a cold start (DefineSecret); and it undefines it when the VM's key has
// left (commit on the source) or is dropped (abort on the destination).
// The hypervisor's Migrate leaves the source's secret alone.

// defineSecret gives the hypervisor k's passphrase as the VM's secret.
func (n *Node) defineSecret(ctx context.Context, vm string, k vtpm.VMKey) error {
	return k.WithPassphrase(func(pass []byte) error {
		return n.cfg.Hypervisor.DefineSecret(ctx, vm, pass)
	})
}

// undefineSecret removes the VM's secret (a missing one is no error).
func (n *Node) undefineSecret(ctx context.Context, vm string) error {
	return n.cfg.Hypervisor.UndefineSecret(ctx, vm)
}

// DefineSecret defines the VM's vTPM secret from its active key, before
// its vTPM starts here on a cold start (hook mode's "prepare begin": a
// hypervisor forgets ephemeral secrets when it restarts). It returns the
// key's generation; ErrNotOwner when this host holds no active key or the
// fleet registry refuses the start (CheckStart).
func (n *Node) DefineSecret(ctx context.Context, vm string) (uint64, error) {
	if err := n.selfFenced("define the vTPM secret of " + vm); err != nil {
		return 0, err
	}
	if _, err := n.CheckStart(ctx, vm); err != nil {
		return 0, fmt.Errorf("define the vTPM secret of %s: %w", vm, err)
	}
	gen, err := n.cfg.Keys.WithPassphrase(ctx, vm, func(pass []byte) error {
		return n.cfg.Hypervisor.DefineSecret(ctx, vm, pass)
	})
	if errors.Is(err, vtpm.ErrKeyNotFound) {
		return 0, fmt.Errorf("define the vTPM secret of %s: %w: %w", vm, ErrNotOwner, err)
	}
	if err != nil {
		return 0, fmt.Errorf("define the vTPM secret of %s: %w", vm, err)
	}
	return gen, nil
}

// Incoming returns the open incoming transaction that holds the VM: its key
// is PENDING here. The ledger alone says what is pending.
func (n *Node) Incoming(vm string) (Tx, bool) {
	txID, err := n.cfg.Ledger.Holder(vm)
	if err != nil {
		return Tx{}, false
	}
	tx, err := n.cfg.Ledger.Get(txID)
	if err != nil || tx.Role != RoleDestination || tx.State != DstPending {
		return Tx{}, false
	}
	return tx, true
}
