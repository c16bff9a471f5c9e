package recovery

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"strconv"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/migrate/registry"
)

// A restore interrupted between its registry Begin and its Commit (vtpmctl
// killed, the operator's machine lost) leaves the registry's transaction
// open, which refuses every later restore or migration of the VM as busy.
// Its destination's recovery cannot close it: the relay keeps no ledger, and
// only the operator's registry transaction decides a restore. So a restore's
// transaction ID names what it is: its first half is derived from the VM,
// the destination and the registry's generation (restoreTxPrefix), its
// second half random. The next restore of the same VM at the same
// generation recognises a transaction an earlier restore left open, closes
// it (the registry's Abort, a compare-and-swap: an earlier run still alive
// and committing first wins, and this one stops), has the destination drop
// what it staged (best effort; its recovery drops it anyway once the
// registry shows the transaction closed), and restores anew.
//
// A migration's transaction ID is random: it matches a restore's prefix
// with probability 2^-64, so a migration is never closed this way. A
// restore's VM never runs before its commit (the destination's start gate
// refuses a PENDING key), so closing an interrupted restore stops nothing
// that runs.

// Crash points of a restore (Restorer.Crash, tests): a killed vtpmctl.
const (
	CrashAfterBegin   = "restore/after-begin"   // registry: the restore's transaction open; nothing sent
	CrashAfterPrepare = "restore/after-prepare" // the destination holds the key PENDING and the state staged
)

// restoreTxPrefix is the first half of a restore's transaction ID.
func restoreTxPrefix(vm, dest string, gen uint64) string {
	h := sha256.Sum256([]byte("vtpmm restore tx v1\x00" + vm + "\x00" + dest + "\x00" + strconv.FormatUint(gen, 10)))
	return hex.EncodeToString(h[:8])
}

// newRestoreTxID returns a restore's transaction ID: the prefix, then 8
// random bytes (32 hex digits in all, like a migration's).
func newRestoreTxID(rnd io.Reader, vm, dest string, gen uint64) (string, error) {
	b := make([]byte, 8)
	if _, err := io.ReadFull(rnd, b); err != nil {
		return "", err
	}
	return restoreTxPrefix(vm, dest, gen) + hex.EncodeToString(b), nil
}

// isRestoreTx reports whether tx, open on vm's record at generation gen,
// is a restore's.
func isRestoreTx(tx registry.OpenTx, vm string, gen uint64) bool {
	p := restoreTxPrefix(vm, tx.To, gen)
	return len(tx.ID) == 2*len(p) && tx.ID[:len(p)] == p
}

// closeInterrupted closes the restore transaction rec shows open (an
// earlier restore's, isRestoreTx): the registry's Abort first, then the
// destination's abort, relayed (best effort). It returns the record after.
func (r *Restorer) closeInterrupted(ctx context.Context, rec registry.VM, log logrus.FieldLogger) (registry.VM, error) {
	tx := *rec.Tx
	b := registry.Batch{TxID: tx.ID, From: rec.Owner, To: tx.To, VMs: []registry.VMGen{{ID: rec.ID, Generation: rec.Generation}}}
	if _, err := r.Registry.Abort(ctx, b); err != nil {
		return rec, fmt.Errorf("close the restore transaction %s an earlier run left open: %w", tx.ID, err)
	}
	if _, err := relayFinish(ctx, r.Admin, tx.To, migrate.FinishRequest{
		Version: migrate.ProtocolVersion, TxID: tx.ID, Abort: []string{rec.ID}}); err != nil && !errors.Is(err, migrate.ErrUnknownTx) {
		log.WithError(err).WithField("tx", tx.ID).Warn("restore: the destination did not confirm dropping what the interrupted restore staged; its recovery drops it")
	}
	log.WithFields(logrus.Fields{"vm": rec.ID, "tx": tx.ID, "dest": tx.To}).Warn("restore: closed the transaction an interrupted restore left open")
	rec.Tx = nil
	return rec, nil
}

// closeOrphanIntent closes a migration's intent that the VM's owner left
// open in the registry and can never finish: the owner is retired (host
// state fenced: the operator declared it dead), and the intent's
// destination, asked (a Finish abort relayed by the local vtpmd), never
// recorded the transaction, so it holds no key of it and never ran the VM
// on one. Anything else (the destination recorded it, or cannot be asked)
// leaves the intent open: the destination's recovery settles it. Soak
// seed 4 in CI: host-b's evacuation left soak-3's intent to host-a open,
// host-b then lost its TPM and was retired, and the restore of soak-3 was
// refused for good ("let it finish first").
func (r *Restorer) closeOrphanIntent(ctx context.Context, rec registry.VM, log logrus.FieldLogger) (bool, error) {
	tx := *rec.Tx
	hv, err := r.Registry.Hosts(ctx, rec.Owner)
	if err != nil {
		return false, fmt.Errorf("read the owner %s: %w", rec.Owner, err)
	}
	if hv.Hosts[rec.Owner].State != registry.StateFenced {
		return false, nil
	}
	_, err = relayFinish(ctx, r.Admin, tx.To, migrate.FinishRequest{Version: migrate.ProtocolVersion, TxID: tx.ID, Abort: []string{rec.ID}})
	if !errors.Is(err, migrate.ErrUnknownTx) {
		log.WithError(err).WithFields(logrus.Fields{"vm": rec.ID, "tx": tx.ID, "dest": tx.To}).Info("restore: the retired owner's open migration is the destination's to settle")
		return false, nil
	}
	b := registry.Batch{TxID: tx.ID, From: rec.Owner, To: tx.To, VMs: []registry.VMGen{{ID: rec.ID, Generation: rec.Generation}}}
	if _, err := r.Registry.Abort(ctx, b); err != nil {
		return false, fmt.Errorf("close the migration %s the retired owner %s left open: %w", tx.ID, rec.Owner, err)
	}
	log.WithFields(logrus.Fields{"vm": rec.ID, "tx": tx.ID, "owner": rec.Owner, "dest": tx.To}).Warn("restore: closed the migration the retired owner left open (its destination never recorded it)")
	return true, nil
}

// killed is an error Restorer.Crash returned: the restore stops there
// with nothing undone.
type killed struct{ err error }

func (k *killed) Error() string { return k.err.Error() }
func (k *killed) Unwrap() error { return k.err }

func (r *Restorer) crash(point string) error {
	if r.Crash == nil {
		return nil
	}
	if err := r.Crash(point); err != nil {
		return &killed{err: fmt.Errorf("restore killed at %s: %w", point, err)}
	}
	return nil
}
