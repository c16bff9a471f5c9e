package migrate

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/hypervisor"
)

// Key and domain apart (soak seed 6014). A hypervisor migration moved a
// VM's domain and vTPM state (encrypted under the VM key) to the
// destination, which ran it on its PENDING key; then the destination lost
// its TPM, and with it its key store and ledger, before the transaction
// committed. The source's recovery hears that the destination never
// recorded the transaction: it aborts and keeps the key, the only copy
// left, and records the VM apart (Apart). The key alone starts nothing
// (the domain and the newest vTPM state are on the other host), and the
// state alone opens nowhere. Reunite moves the key to them: a key-only
// move, attested, registered and two-phase like a migration, once the
// other host is back on its new TPM and enrolled.

// Reunite moves the key of every VM recorded apart to the host that holds
// its domain, and returns the VMs it moved. A record is dropped once the
// key moved, once this host no longer holds the key (it moved on, or the
// operator restored the VM elsewhere), or once the VM's domain is defined
// here again (the key stays with it). While the other host is
// unreachable, refused by attestation or by the registry, or does not
// report the domain, the record stays and the next round tries again.
func (n *Node) Reunite(ctx context.Context) ([]string, error) {
	list, err := n.cfg.Ledger.Aparts()
	if err != nil {
		return nil, fmt.Errorf("reunite: %w", err)
	}
	if len(list) == 0 {
		return nil, nil
	}
	held, err := n.heldGenerations(ctx) // headers only: no key is opened to ask
	if err != nil {
		return nil, fmt.Errorf("reunite: %w", err)
	}
	var moved []string
	var errs []error
	for _, a := range list {
		_, owned := held[a.VM]
		ok, err := n.reuniteOne(ctx, a, owned)
		if err != nil {
			errs = append(errs, fmt.Errorf("reunite %s with its domain on %s: %w", a.VM, a.Host, err))
		}
		if ok {
			moved = append(moved, a.VM)
		}
	}
	return moved, errors.Join(errs...)
}

func (n *Node) reuniteOne(ctx context.Context, a Apart, owned bool) (bool, error) {
	log := n.log.WithFields(logrus.Fields{"vm": a.VM, "dest": a.Host, "tx": a.Tx})
	drop := func(why string) (bool, error) {
		log.Info("reunite: record dropped: " + why)
		return false, n.cfg.Ledger.ClearApart(a.VM)
	}
	if !owned {
		return drop("the key is no longer on this host")
	}
	if d, err := n.cfg.Hypervisor.Domain(ctx, a.VM); err != nil {
		return false, err
	} else if d.State != hypervisor.StateAbsent {
		return drop("the VM's domain is defined here again; the key stays with it")
	}
	if txID, err := n.cfg.Ledger.Holder(a.VM); err == nil {
		return false, fmt.Errorf("%w: transaction %s holds the VM", ErrBusy, txID)
	}
	// One cheap question before a move: is the domain there (yet)?
	peer, err := n.cfg.Dial(ctx, a.Host)
	if err != nil {
		return false, fmt.Errorf("%w: %v", ErrPeer, err)
	}
	st, err := peer.Status(ctx, &StatusRequest{TxID: a.Tx, VMs: []string{a.VM}, From: n.cfg.Host})
	if err != nil {
		return false, fmt.Errorf("%w: status: %w", ErrPeer, err)
	}
	if !slices.Contains(st.Stopped, a.VM) {
		return false, fmt.Errorf("%w: %s does not report it defined and shut off", ErrNoDomain, a.Host)
	}
	res, err := n.Migrate(ctx, Request{VMs: []string{a.VM}, Dest: a.Host, KeyOnly: true}, nil)
	if err != nil {
		return false, err
	}
	if !slices.Contains(res.Committed, a.VM) {
		return false, fmt.Errorf("%w: not committed: %s", ErrUnresolved, res.Failed[a.VM])
	}
	log.WithField("move", res.TxID).Info("reunite: the VM's key moved to the host that holds its domain and vTPM state")
	return true, n.cfg.Ledger.ClearApart(a.VM)
}

// noDomainHere refuses a key-only move of a VM whose domain is defined here.
func (n *Node) noDomainHere(ctx context.Context, vms []string) error {
	for _, id := range vms {
		d, err := n.cfg.Hypervisor.Domain(ctx, id)
		if err != nil {
			return fmt.Errorf("migrate %s: %w", id, err)
		}
		if d.State != hypervisor.StateAbsent {
			return fmt.Errorf("migrate %s: %w (%s): a key-only move is for a VM whose domain is on the destination", id, ErrDomainHere, d.State)
		}
	}
	return nil
}

// domainsThere is a key-only move's hypervisor step: each VM's outcome is
// whether the destination, which holds the transaction now, reports its
// domain defined and shut off.
func (n *Node) domainsThere(ctx context.Context, peer Peer, tx Tx) map[string]error {
	out := make(map[string]error, len(tx.VMs))
	st, err := peer.Status(ctx, &StatusRequest{TxID: tx.ID, VMs: vmIDs(tx.VMs), From: n.cfg.Host})
	for _, vm := range tx.VMs {
		switch {
		case err != nil:
			out[vm.UUID] = fmt.Errorf("%w: status: %w", ErrPeer, err)
		case !slices.Contains(st.Stopped, vm.UUID):
			out[vm.UUID] = fmt.Errorf("%w: %s does not report it defined and shut off", ErrNoDomain, tx.Peer)
		}
	}
	return out
}
