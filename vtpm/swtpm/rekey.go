package swtpm

import (
	"github.com/vtpmm/vtpmm/internal/atomicfile"

	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/vtpm"
)

// Rekey re-encrypts a shut-off vTPM's state under a new key without any
// plaintext state or key on disk, and keeps the old state until the new
// one is verified:
//
//  1. export: the state files are copied (encrypted) to D.rekey-src; an
//     swtpm with --key OLD and --migration-key NEW loads the copy and hands
//     out the state blobs, encrypted under NEW; the copy is removed. D is
//     never opened, so nothing in it changes (reading the volatile blob
//     deletes swtpm's saved volatile state). The blobs are read without their state-key layer
//     (as QEMU reads them), so the migration key is their only encryption
//     outside swtpm and the state key can change on import.
//  2. import: an swtpm with --key NEW and --migration-key NEW on the empty
//     D.rekey-new takes the blobs (decrypted with the migration key in
//     swtpm's memory, stored encrypted under NEW).
//  3. verify: a fresh swtpm with only NEW initialises D.rekey-new; every
//     state file must be encrypted; files and directory are fsynced.
//  4. swap: D is renamed to D.rekey-old, then D.rekey-new to D.
//
// The passphrases reach swtpm on inherited pipes only. At every moment the
// directory layout says which key opens D (RekeyPhaseOf), so a crash at
// any step recovers with RecoverRekey. The caller keeps both keys in the
// key store until the swap is durable:
//
//	ks.PutRekey(vm, newKey)        // the new key, pending
//	swtpm.Rekey(...)               // returns once D opens with the new key
//	ks.CommitRekey(vm)             // the new key replaces the old one
//	swtpm.FinishRekey(D)           // shred D.rekey-old
//
// and after a crash, before the VM starts:
//
//	newKey, err := swtpm.RecoverRekey(ctx, D)
//	if newKey { ks.CommitRekey(vm); swtpm.FinishRekey(D) } else { ks.DropRekey(vm) }
//
// Rekey costs no host TPM command: the keys come from the key store, which
// opens envelopes with the vault key in memory.

// ErrRekeyState means a vTPM's state directory is in the middle of an
// unfinished rekey (or its layout is inconsistent): run RecoverRekey.
// (Kept here rather than in errors.go while other work edits the package's
// existing files; move it there when merging.)
var ErrRekeyState = errors.New("vTPM rekey unfinished")

// RekeyPoint names a step of Rekey where a test can make it "crash".
type RekeyPoint string

// Rekey crash points, in order.
const (
	RekeyAfterExport RekeyPoint = "rekey/after-export" // blobs in memory; D.rekey-src may remain
	RekeyAfterImport RekeyPoint = "rekey/after-import" // D.rekey-new written, not verified
	RekeyAfterVerify RekeyPoint = "rekey/after-verify" // D.rekey-new verified and synced; D untouched
	RekeyMidSwap     RekeyPoint = "rekey/mid-swap"     // D renamed to D.rekey-old; no D
	RekeyAfterSwap   RekeyPoint = "rekey/after-swap"   // D is the new state; D.rekey-old the old one
)

// RekeyPoints lists every crash point, for tests that visit them all.
var RekeyPoints = []RekeyPoint{RekeyAfterExport, RekeyAfterImport, RekeyAfterVerify, RekeyMidSwap, RekeyAfterSwap}

// Directory suffixes used by Rekey, next to the state directory D.
const (
	rekeySrc = ".rekey-src"
	rekeyNew = ".rekey-new"
	rekeyOld = ".rekey-old"
)

// RekeyConfig describes one rekey.
type RekeyConfig struct {
	StateDir      string // D: the vTPM state directory (the VM is shut off)
	OldPassphrase []byte // opens D now
	NewPassphrase []byte // opens D afterwards
	Log           logrus.FieldLogger
	// Crash, when set (tests only), is called at every RekeyPoint; a
	// non-nil error stops Rekey there as if the process died.
	Crash func(RekeyPoint) error
}

// RekeyResult reports what a rekey did.
type RekeyResult struct {
	Elapsed time.Duration
	Blobs   int // state blobs carried (permanent, and volatile when saved)
	Bytes   int // their size
}

// RekeyPhase is where an interrupted rekey stands, read from the layout.
type RekeyPhase int

// Rekey phases.
const (
	// RekeyIdle: only D. It opens with the key the key store has committed.
	RekeyIdle RekeyPhase = iota
	// RekeyBuilding: D and D.rekey-new (or D.rekey-src). D opens with the
	// OLD key; the new state is incomplete or unverified.
	RekeyBuilding
	// RekeySwapping: D.rekey-old and D.rekey-new, no D (a crash between the
	// two renames). The verified new state is complete: it opens with NEW.
	RekeySwapping
	// RekeySwapped: D and D.rekey-old. D opens with the NEW key.
	RekeySwapped
)

func (p RekeyPhase) String() string {
	return [...]string{"idle", "building", "swapping", "swapped"}[p]
}

// RekeyPhaseOf reads the phase of D from the directories next to it.
func RekeyPhaseOf(stateDir string) (RekeyPhase, error) {
	d, err := filepath.Abs(stateDir)
	if err != nil {
		return 0, err
	}
	has := func(p string) (bool, error) {
		_, err := os.Lstat(p)
		if errors.Is(err, os.ErrNotExist) {
			return false, nil
		}
		return err == nil, err
	}
	var cur, nw, old bool
	for _, x := range []struct {
		p string
		b *bool
	}{{d, &cur}, {d + rekeyNew, &nw}, {d + rekeyOld, &old}} {
		if *x.b, err = has(x.p); err != nil {
			return 0, fmt.Errorf("rekey phase of %s: %w", d, err)
		}
	}
	switch {
	case cur && old:
		return RekeySwapped, nil
	case !cur && old && nw:
		return RekeySwapping, nil
	case cur && nw:
		return RekeyBuilding, nil
	case cur:
		if src, err := has(d + rekeySrc); err != nil || src {
			return RekeyBuilding, err
		}
		return RekeyIdle, nil
	}
	return 0, fmt.Errorf("rekey phase of %s: %w: neither the state directory nor a complete new state exists (current %v, new %v, old %v)",
		d, ErrRekeyState, cur, nw, old)
}

// Rekey re-encrypts the vTPM state in cfg.StateDir from OldPassphrase to
// NewPassphrase (see the comment above for the steps and the recovery).
// It refuses to run while an earlier rekey of D is unfinished
// (ErrRekeyState: call RecoverRekey, and FinishRekey). A wrong old
// passphrase returns ErrWrongPassphrase and leaves D untouched.
func Rekey(ctx context.Context, cfg RekeyConfig) (RekeyResult, error) {
	t0 := time.Now()
	if err := available(); err != nil {
		return RekeyResult{}, err
	}
	if cfg.StateDir == "" || len(cfg.OldPassphrase) == 0 || len(cfg.NewPassphrase) == 0 {
		return RekeyResult{}, fmt.Errorf("rekey: %w: StateDir, OldPassphrase and NewPassphrase are required", ErrBadConfig)
	}
	if bytes.Equal(cfg.OldPassphrase, cfg.NewPassphrase) {
		return RekeyResult{}, fmt.Errorf("rekey: %w: the new passphrase equals the old one", ErrBadConfig)
	}
	d, err := filepath.Abs(cfg.StateDir)
	if err != nil {
		return RekeyResult{}, fmt.Errorf("rekey: %w: %v", ErrBadConfig, err)
	}
	if err := checkOptPath(d + rekeyNew); err != nil {
		return RekeyResult{}, fmt.Errorf("rekey: %w", err)
	}
	log := logger(cfg.Log).WithField("vtpm", filepath.Base(filepath.Dir(d)))
	crash := func(p RekeyPoint) error {
		if cfg.Crash == nil {
			return nil
		}
		return cfg.Crash(p)
	}
	if ph, err := RekeyPhaseOf(d); err != nil {
		return RekeyResult{}, fmt.Errorf("rekey: %w", err)
	} else if ph != RekeyIdle {
		return RekeyResult{}, fmt.Errorf("rekey %s: %w: an earlier rekey is %s; run RecoverRekey first", d, ErrRekeyState, ph)
	}
	if _, err := os.Stat(filepath.Join(d, permallFile)); err != nil {
		return RekeyResult{}, fmt.Errorf("rekey %s: %w: no %s (%v)", d, ErrBadStateBlob, permallFile, err)
	}

	// 1. Export from an encrypted copy, under the new migration key.
	st, err := exportForRekey(ctx, d, cfg.OldPassphrase, cfg.NewPassphrase, log)
	if err != nil {
		return RekeyResult{}, fmt.Errorf("rekey %s: %w", d, err)
	}
	res := RekeyResult{Blobs: 1, Bytes: len(st.Permanent) + len(st.Volatile)}
	if len(st.Volatile) > 0 {
		res.Blobs++
	}
	if err := crash(RekeyAfterExport); err != nil {
		return res, err
	}

	// 2. Import into D.rekey-new under the new key.
	nd := d + rekeyNew
	if err := os.Mkdir(nd, 0o700); err != nil {
		return res, fmt.Errorf("rekey %s: %w", d, err)
	}
	if err := runSwtpm(ctx, nd, cfg.NewPassphrase, cfg.NewPassphrase, log, func(p *Process) error {
		if err := ImportState(ctx, p, st); err != nil {
			return err
		}
		if err := p.ctrl.Init(ctx, 0); err != nil {
			return err
		}
		if len(st.Volatile) > 0 {
			// A volatile blob lives in libtpms' memory only; write it
			// (under the new key) so the next start resumes it.
			return p.ctrl.StoreVolatile(ctx)
		}
		return nil
	}); err != nil {
		return res, fmt.Errorf("rekey %s: import: %w", d, err)
	}
	if err := crash(RekeyAfterImport); err != nil {
		return res, err
	}

	// 3. Verify with the new key alone, check encryption at rest, sync.
	if err := runSwtpm(ctx, nd, cfg.NewPassphrase, cfg.NewPassphrase, log, func(p *Process) error {
		return p.ctrl.Init(ctx, 0)
	}); err != nil {
		return res, fmt.Errorf("rekey %s: verify: %w", d, err)
	}
	if err := CheckEncryptedAtRest(nd); err != nil {
		return res, fmt.Errorf("rekey %s: verify: %w", d, err)
	}
	if err := syncTree(nd); err != nil {
		return res, fmt.Errorf("rekey %s: %w", d, err)
	}
	if err := crash(RekeyAfterVerify); err != nil {
		return res, err
	}

	// 4. Swap: two renames, each made durable.
	if err := renameSync(d, d+rekeyOld); err != nil {
		return res, fmt.Errorf("rekey %s: swap: %w", d, err)
	}
	if err := crash(RekeyMidSwap); err != nil {
		return res, err
	}
	if err := renameSync(nd, d); err != nil {
		return res, fmt.Errorf("rekey %s: swap: %w", d, err)
	}
	if err := crash(RekeyAfterSwap); err != nil {
		return res, err
	}
	res.Elapsed = time.Since(t0)
	log.WithFields(logrus.Fields{"elapsed": res.Elapsed, "bytes": res.Bytes}).Info("vTPM state re-encrypted under a new key")
	return res, nil
}

// RecoverRekey brings D back to a state that opens with exactly one key
// and reports which: newKey is true when D now opens with the new key (the
// caller commits the pending key, then calls FinishRekey), false when it
// opens with the key the key store has committed (the caller drops a
// pending key). It removes an unfinished new state and completes a swap
// interrupted between its two renames.
func RecoverRekey(ctx context.Context, stateDir string) (newKey bool, err error) {
	d, err := filepath.Abs(stateDir)
	if err != nil {
		return false, err
	}
	if err := ctx.Err(); err != nil {
		return false, err
	}
	ph, err := RekeyPhaseOf(d)
	if err != nil {
		return false, fmt.Errorf("recover rekey: %w", err)
	}
	switch ph {
	case RekeyIdle:
		return false, nil
	case RekeyBuilding:
		for _, p := range []string{d + rekeyNew, d + rekeySrc} {
			if err := os.RemoveAll(p); err != nil {
				return false, fmt.Errorf("recover rekey %s: %w", d, err)
			}
		}
		return false, atomicfile.SyncDir(filepath.Dir(d))
	case RekeySwapping:
		if err := renameSync(d+rekeyNew, d); err != nil {
			return false, fmt.Errorf("recover rekey %s: %w", d, err)
		}
		return true, nil
	}
	return true, nil // RekeySwapped
}

// FinishRekey shreds the old state (D.rekey-old), once the key store has
// committed the new key. It is idempotent.
func FinishRekey(ctx context.Context, stateDir string) error {
	d, err := filepath.Abs(stateDir)
	if err != nil {
		return err
	}
	old := d + rekeyOld
	ents, err := os.ReadDir(old)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("finish rekey %s: %w", d, err)
	}
	for _, e := range ents {
		if err := ctx.Err(); err != nil {
			return err
		}
		p := filepath.Join(old, e.Name())
		if e.Type().IsRegular() {
			if err := vtpm.Shred(p); err != nil {
				return fmt.Errorf("finish rekey %s: %w", d, err)
			}
		}
	}
	if err := os.RemoveAll(old); err != nil {
		return fmt.Errorf("finish rekey %s: %w", d, err)
	}
	return atomicfile.SyncDir(filepath.Dir(d))
}
