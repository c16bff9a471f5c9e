package host

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/swtpm"
)

// Key rotation (docs/rekey.md). A VM's key is replaced, and its vTPM state
// re-encrypted under the new key, at the VM's next cold start after it
// arrived by migration (KeyStore.NeedsRotation: every host that held the VM
// may have kept the old key), and on demand ('vtpmctl vm rekey'). The VM
// must be shut off. After the rekey a former holder's key opens nothing.
// It costs no host TPM command.

// RekeyResult reports a rekey.
type RekeyResult struct {
	VM         string
	Generation uint64 // unchanged: a rekey is no ownership step
	Elapsed    time.Duration
	Bytes      int // vTPM state re-encrypted
}

// NeedsRotation reports whether the VM's key came by migration and was not
// replaced since.
func (h *Host) NeedsRotation(vm string) bool { return h.keys.NeedsRotation(vm) }

// Rekey replaces the VM's key and re-encrypts its shut-off vTPM state in
// stateDir under the new one: the new key is stored pending, swtpm.Rekey
// re-encrypts the state, the key store commits the new key, define (when
// set) gives its passphrase to the hypervisor as the VM's secret, and the
// old state is shredded. On failure the state opens with the old key and
// the pending key is dropped (or, if the swap went through, committed):
// RecoverRekey decides from the layout. A VM whose vTPM this host runs
// itself is refused (ErrVMRunning).
func (h *Host) Rekey(ctx context.Context, vm, stateDir string, define func(pass []byte) error) (RekeyResult, error) {
	h.mu.Lock()
	_, running := h.procs[vm]
	h.mu.Unlock()
	if running {
		return RekeyResult{}, fmt.Errorf("rekey VM %s: %w: stop it first", vm, ErrVMRunning)
	}
	t0 := time.Now()
	old, gen, err := h.keys.Get(ctx, vm)
	if err != nil {
		return RekeyResult{}, fmt.Errorf("rekey VM %s: %w", vm, err)
	}
	defer old.Destroy()
	nk, err := vtpm.NewVMKey(h.opts.Rand)
	if err != nil {
		return RekeyResult{}, err
	}
	defer nk.Destroy()
	if err := h.RecoverRekey(ctx, vm, stateDir); err != nil {
		return RekeyResult{}, err
	}
	if err := h.keys.PutRekey(ctx, vm, nk); err != nil {
		return RekeyResult{}, fmt.Errorf("rekey VM %s: %w", vm, err)
	}
	log := h.log.WithFields(logrus.Fields{"vm": vm, "generation": gen})
	var res swtpm.RekeyResult
	err = old.WithPassphrase(func(op []byte) error {
		return nk.WithPassphrase(func(np []byte) error {
			var err error
			res, err = swtpm.Rekey(ctx, swtpm.RekeyConfig{StateDir: stateDir, OldPassphrase: op, NewPassphrase: np, Log: log})
			return err
		})
	})
	if err != nil {
		if rerr := h.RecoverRekey(context.WithoutCancel(ctx), vm, stateDir); rerr != nil {
			err = errors.Join(err, rerr)
		}
		return RekeyResult{}, fmt.Errorf("rekey VM %s: %w", vm, err)
	}
	if err := h.keys.CommitRekey(ctx, vm); err != nil {
		return RekeyResult{}, fmt.Errorf("rekey VM %s: %w", vm, err)
	}
	var derr error
	if define != nil {
		derr = nk.WithPassphrase(define)
	}
	if err := swtpm.FinishRekey(ctx, stateDir); err != nil {
		return RekeyResult{}, fmt.Errorf("rekey VM %s: %w", vm, err)
	}
	out := RekeyResult{VM: vm, Generation: gen, Elapsed: time.Since(t0), Bytes: res.Bytes}
	log.WithFields(logrus.Fields{"took_ms": out.Elapsed.Milliseconds(), "bytes": res.Bytes}).Info("VM key replaced; the vTPM state is under the new key")
	if derr != nil {
		return out, fmt.Errorf("rekey VM %s: the new key is in place, but redefining the hypervisor's secret failed (the next start defines it): %w", vm, derr)
	}
	return out, nil
}
