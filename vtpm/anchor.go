package vtpm

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// The rollback anchor ties the data directory to a monotonic counter in the
// host TPM, so that a data directory restored from a backup (or copied back)
// is detected at start, and so is a subset of key envelopes restored.
//
// DATA/anchor.json records the counter value the directory corresponds to
// and the ownership facts at that value: the (VM, generation) pairs the key
// store holds. Each ownership step (a migration committed on the source or
// the destination) is written ahead, then counted:
//
//  1. Advance writes the file with counter N+1, the new holdings, and the
//     step as an unsettled change (each VM's old and new generation);
//  2. Advance increments the TPM counter to N+1 (one NV_Increment, the only
//     TPM command of a step);
//  3. the caller changes the key store (commits or shreds keys);
//  4. Settle records the key store's outcome and drops the unsettled change
//     (a file write, no TPM command).
//
// At start, Check reads the counter (one NV_Read) and compares:
//   - file == TPM: the directory is current; each VM must be held as
//     recorded, or, for a VM of an unsettled change, at either end of it;
//   - file == TPM+1: a crash hit between 1 and 2: Check completes the
//     increment (one more NV_Increment, in this case only) and goes on as
//     above; the step stays unsettled (the caller never changed the key
//     store, its VMs are at their old generations) until it is settled;
//   - file < TPM: the directory is older than the TPM (a RollbackError);
//   - file > TPM+1: the file belongs to another TPM (ErrAnchorAhead).
//
// A counter value is never reused for another step: a step whose increment
// did not reach the TPM is completed, not dropped. So every file ever
// written with counter N agrees with the live one on each VM, up to the VMs
// of an unsettled step, and a restored old directory always has file < TPM
// once any later step ran, whatever moment the backup caught.

// AnchorConfig says where the anchor lives.
type AnchorConfig struct {
	Dir   string         // data directory; the file is Dir/anchor.json
	Index tpm2.TPMHandle // NV index; DefaultAnchorIndex when zero
	// OwnerAuth is the owner hierarchy's authValue, needed only to define
	// (InitAnchor) or replace the index. Empty on most hosts.
	OwnerAuth []byte
	Now       func() time.Time
}

func (c AnchorConfig) withDefaults() AnchorConfig {
	if c.Index == 0 {
		c.Index = DefaultAnchorIndex
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	return c
}

func (c AnchorConfig) path() string { return filepath.Join(c.Dir, AnchorFileName) }

// Anchor is an open rollback anchor. It is safe for concurrent use; its
// operations are serialised (each costs at most one TPM command).
type Anchor struct {
	cfg    AnchorConfig
	keyID  string
	macKey []byte
	nv     nvAnchor

	mu        sync.Mutex
	file      anchorFile
	mark      *AuditMark
	needCheck bool // an increment's outcome is unknown; resync before the next step
}

// RollbackError says that the data directory is older than the host TPM's
// anchor counter. It matches ErrRollback.
type RollbackError struct {
	File        string         // the anchor file
	Index       tpm2.TPMHandle // the NV index
	FileCounter uint64         // what the file records
	TPMCounter  uint64         // what the TPM holds
}

func (e *RollbackError) Error() string {
	return fmt.Sprintf("%v: %s records anchor counter %d, the host TPM's NV index 0x%08x holds %d: %d ownership step(s) (migrations committed or opened)"+
		" counted since are missing from this data directory (was it restored from a backup or copied back?)."+
		" vtpmd refuses to start: VMs this directory lists may be owned and running elsewhere now."+
		" Restore the newest copy of the directory, or confirm every VM's owner with the registry or the peers,"+
		" remove what this host no longer owns, and accept the state with 'vtpmd anchor accept' (audited)",
		ErrRollback, e.File, e.FileCounter, uint32(e.Index), e.TPMCounter, e.TPMCounter-e.FileCounter)
}

// Is matches ErrRollback.
func (e *RollbackError) Is(t error) bool { return t == ErrRollback }

// AnchorStatus is what Check found.
type AnchorStatus struct {
	File       string
	Counter    uint64 // the directory's counter, equal to the TPM's after Check
	TPMCounter uint64
	// Repaired reports that the increment of the last step had not reached
	// the TPM (a crash between the file write and the increment) and Check
	// completed it: one more NV_Increment.
	Repaired bool
	// Pending lists unsettled steps (a crash between the increment and
	// Settle). Call SettleAll with the same facts before reconciling the
	// ledger: it records where each of their VMs actually is, and a step
	// that reconciliation re-runs takes a new Advance.
	Pending []AnchorTicket
	// Damaged echoes the VMs not compared (Facts.Damaged).
	Damaged []string
	// Advances counts the steps since init; > 0 means the ledger and the
	// audit log have history.
	Advances uint64
}

func newAnchor(tpm transport.TPM, v *Vault, cfg AnchorConfig) (*Anchor, error) {
	if v == nil || v.key == nil || v.aead == nil {
		return nil, ErrVaultLocked
	}
	if err := checkAnchorIndex(cfg.Index); err != nil {
		return nil, err
	}
	auth, err := anchorAuthValue(v.key)
	if err != nil {
		return nil, err
	}
	mk, err := anchorMACKey(v.key)
	if err != nil {
		return nil, err
	}
	name, err := anchorName(cfg.Index)
	if err != nil {
		return nil, err
	}
	return &Anchor{cfg: cfg, keyID: v.KeyID(), macKey: mk, nv: nvAnchor{tpm: tpm, idx: cfg.Index, name: name, auth: auth}}, nil
}

// OpenAnchor reads and authenticates the anchor file. It runs no TPM
// command unless the file is missing, when one NV_ReadPublic tells
// ErrAnchorNotInitialized (no index either: run InitAnchor) from
// ErrAnchorFileMissing (the TPM holds the anchor: the directory was replaced
// or the file deleted; see AcceptAnchorState). Call Check next.
func OpenAnchor(ctx context.Context, tpm transport.TPM, v *Vault, cfg AnchorConfig) (*Anchor, error) {
	cfg = cfg.withDefaults()
	a, err := newAnchor(tpm, v, cfg)
	if err != nil {
		return nil, fmt.Errorf("open anchor: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	f, err := readAnchorFile(cfg.path(), a.keyID, a.macKey)
	if errors.Is(err, ErrAnchorNotInitialized) {
		_, _, defined, perr := readAnchorPublic(tpm, cfg.Index)
		if perr != nil {
			return nil, fmt.Errorf("open anchor: %w", perr)
		}
		if defined {
			return nil, fmt.Errorf("open anchor: %w: %s does not exist, but the host TPM holds NV index 0x%08x: this data directory"+
				" was replaced or the file deleted; restore the directory, or confirm every VM's owner with the registry or the peers"+
				" and run 'vtpmd anchor accept' (audited)", ErrAnchorFileMissing, cfg.path(), uint32(cfg.Index))
		}
		return nil, fmt.Errorf("open anchor: %w", err)
	}
	if err != nil {
		return nil, fmt.Errorf("open anchor: %w", err)
	}
	if err := a.matchesFile(f); err != nil {
		return nil, fmt.Errorf("open anchor: %w", err)
	}
	a.file = f
	a.mark = f.Audit
	return a, nil
}

func (a *Anchor) matchesFile(f anchorFile) error {
	if f.Index != fmt.Sprintf("0x%08x", uint32(a.cfg.Index)) {
		return &AnchorFileError{Path: a.cfg.path(), Err: ErrCorrupt,
			Problem: fmt.Sprintf("it names NV index %s, the configured index is 0x%08x", f.Index, uint32(a.cfg.Index))}
	}
	return nil
}

// Path is the anchor file.
func (a *Anchor) Path() string { return a.cfg.path() }

// Counter is the counter value the data directory corresponds to.
func (a *Anchor) Counter() uint64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.file.Counter
}

// Advances counts the ownership steps since init that the ledger and the
// audit log record (migrations; not AdvanceCreate). A host with Advances > 0
// has committed migrations, so its ledger and audit log must have history.
func (a *Anchor) Advances() uint64 {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.file.Advances
}

// AuditMark returns the audit log position the file last recorded, or nil.
func (a *Anchor) AuditMark() *AuditMark {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.file.Audit == nil {
		return nil
	}
	m := *a.file.Audit
	return &m
}

// SetAuditMark sets the audit log position written with the next Advance
// or Settle.
func (a *Anchor) SetAuditMark(m AuditMark) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.mark = &m
}

// RecordAuditMark writes the audit log's position into the anchor file now
// (one file write, no TPM command), so that a log cut back or replaced
// after it is detected at the next start even before the next ownership
// step (vtpmd records it when it starts and when it stops).
func (a *Anchor) RecordAuditMark(ctx context.Context, m AuditMark) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return err
	}
	a.mark = &m
	if err := a.save(a.file); err != nil {
		return fmt.Errorf("record audit mark: %w", err)
	}
	a.file.Audit = &m
	return nil
}

// Close wipes the derived keys.
func (a *Anchor) Close() {
	a.mu.Lock()
	defer a.mu.Unlock()
	wipe(a.macKey)
	wipe(a.nv.auth)
}

func (a *Anchor) save(f anchorFile) error {
	f.Updated = a.cfg.Now().UTC()
	if a.mark != nil {
		m := *a.mark
		f.Audit = &m
	}
	return writeAnchorFile(a.cfg.path(), f, a.macKey)
}

// Check compares the data directory with the TPM: one NV_Read. See the
// package comment above for the cases. It returns a *RollbackError when the
// directory is older than the TPM, an *AnchorMismatchError naming each VM
// the key store holds differently from the record, ErrAnchorAhead when the
// file is ahead of the TPM, ErrAnchorMissing when the TPM has no anchor and
// ErrAnchorConflict when the index is not this vault's.
func (a *Anchor) Check(ctx context.Context, facts Facts) (*AnchorStatus, error) {
	if err := checkFacts(facts); err != nil {
		return nil, fmt.Errorf("check anchor: %w", err)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	v, err := a.nv.read()
	if err != nil {
		return nil, fmt.Errorf("check anchor: %w", err)
	}
	st := &AnchorStatus{File: a.cfg.path(), TPMCounter: v, Damaged: slices.Clone(facts.Damaged)}
	switch c := a.file.Counter; {
	case c < v:
		return nil, &RollbackError{File: a.cfg.path(), Index: a.cfg.Index, FileCounter: c, TPMCounter: v}
	case c > v+1:
		return nil, fmt.Errorf("check anchor: %w: %s records counter %d, NV index 0x%08x holds %d (a file from another TPM, or the TPM's index was replaced)",
			ErrAnchorAhead, a.cfg.path(), c, uint32(a.cfg.Index), v)
	case c == v+1:
		if err := a.nv.increment(); err != nil {
			return nil, fmt.Errorf("check anchor: complete the last step's increment: %w", err)
		}
		st.TPMCounter = c
		st.Repaired = true
	}
	a.needCheck = false
	st.Counter = a.file.Counter
	st.Advances = a.file.Advances
	if diffs := compareFacts(a.file, facts); len(diffs) > 0 {
		return nil, &AnchorMismatchError{File: a.cfg.path(), Keys: filepath.Join(a.cfg.Dir, "keys"), Diffs: diffs}
	}
	for _, p := range a.file.Pending {
		st.Pending = append(st.Pending, AnchorTicket(p.Ticket))
	}
	return st, nil
}

// Advance records an ownership step and counts it in the TPM: exactly one
// TPM command (NV_Increment in a password session). Call it before changing
// the key store, then Settle with the key store's outcome. changes says
// what this host will hold after the step (Generation 0: no key). A VM of
// an unsettled step is refused (ErrAnchorBusy).
func (a *Anchor) Advance(ctx context.Context, changes []Change) (AnchorTicket, error) {
	return a.advance(ctx, changes, true)
}

// AdvanceCreate is Advance for the creation of VMs on this host: the same
// step, counted in the TPM, but not in Advances, because a creation leaves
// no record in the ledger or the audit log (Advances > 0 tells that they
// must have history).
func (a *Anchor) AdvanceCreate(ctx context.Context, changes []Change) (AnchorTicket, error) {
	return a.advance(ctx, changes, false)
}

func (a *Anchor) advance(ctx context.Context, changes []Change, history bool) (AnchorTicket, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	if a.needCheck {
		if err := a.resync(); err != nil {
			return 0, fmt.Errorf("advance anchor: %w", err)
		}
	}
	busy := map[string]bool{}
	for _, p := range a.file.Pending {
		for _, c := range p.Changes {
			busy[c.VMID] = true
		}
	}
	m := holdingMap(a.file.Holdings)
	step := anchorPending{Ticket: a.file.Counter + 1}
	seen := map[string]bool{}
	for _, c := range changes {
		if err := CheckVMID(c.VMID); err != nil {
			return 0, fmt.Errorf("advance anchor: %w", err)
		}
		if busy[c.VMID] || seen[c.VMID] {
			return 0, fmt.Errorf("advance anchor: %w: VM %s", ErrAnchorBusy, c.VMID)
		}
		seen[c.VMID] = true
		step.Changes = append(step.Changes, pendingChange{VMID: c.VMID, From: m[c.VMID], To: c.Generation})
		m[c.VMID] = c.Generation
	}
	next := a.file
	next.Counter++
	if history {
		next.Advances++
	}
	next.Holdings = sortedHoldings(m)
	next.Pending = append(slices.Clone(a.file.Pending), step)
	if err := a.save(next); err != nil {
		return 0, fmt.Errorf("advance anchor: %w", err)
	}
	if err := a.nv.increment(); err != nil {
		// The caller will not change the key store, so the step's outcome
		// is known: nothing moved. Counter N+1 stays used (the TPM may or
		// may not have reached it; the next step or Check completes it), so
		// no other step is ever written with it.
		a.needCheck = true
		burned := next
		burned.Holdings = a.file.Holdings
		burned.Pending = a.file.Pending
		if serr := a.save(burned); serr != nil {
			// The file still holds the step as unsettled, which Check
			// accepts at either end.
			a.file = next
			return 0, fmt.Errorf("advance anchor: %w (and rewriting the file: %v)", err, serr)
		}
		a.file = burned
		return 0, fmt.Errorf("advance anchor: %w", err)
	}
	a.file = next
	return AnchorTicket(next.Counter), nil
}

// resync reads the counter and completes an increment that did not reach
// the TPM. Called with a.mu held.
func (a *Anchor) resync() error {
	v, err := a.nv.read()
	if err != nil {
		return err
	}
	switch c := a.file.Counter; {
	case c == v:
	case c == v+1:
		if err := a.nv.increment(); err != nil {
			return err
		}
	case c < v:
		return &RollbackError{File: a.cfg.path(), Index: a.cfg.Index, FileCounter: c, TPMCounter: v}
	default:
		return fmt.Errorf("%w: file %d, TPM %d", ErrAnchorAhead, c, v)
	}
	a.needCheck = false
	return nil
}

// Settle records how the key store ended a step: each VM of the step must be
// held at its old or its new generation (now lists the VMs the key store
// holds; VMs not listed hold no key). No TPM command: one file write.
// Settling a step that is not pending is a no-op.
func (a *Anchor) Settle(ctx context.Context, t AnchorTicket, now Facts) error {
	if err := checkFacts(now); err != nil {
		return fmt.Errorf("settle anchor: %w", err)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return err
	}
	return a.settle(map[AnchorTicket]bool{t: true}, now)
}

// SettleAll settles every pending step against the key store's facts, after
// a restart once the ledger is reconciled.
func (a *Anchor) SettleAll(ctx context.Context, now Facts) error {
	if err := checkFacts(now); err != nil {
		return fmt.Errorf("settle anchor: %w", err)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := ctx.Err(); err != nil {
		return err
	}
	all := map[AnchorTicket]bool{}
	for _, p := range a.file.Pending {
		all[AnchorTicket(p.Ticket)] = true
	}
	return a.settle(all, now)
}

func (a *Anchor) settle(which map[AnchorTicket]bool, now Facts) error {
	have := holdingMap(now.Holdings)
	m := holdingMap(a.file.Holdings)
	var keep []anchorPending
	var diffs []HoldingDiff
	hit := false
	for _, p := range a.file.Pending {
		if !which[AnchorTicket(p.Ticket)] {
			keep = append(keep, p)
			continue
		}
		hit = true
		for _, c := range p.Changes {
			h := have[c.VMID]
			if h != c.From && h != c.To {
				diffs = append(diffs, HoldingDiff{VMID: c.VMID, Anchor: c.To, AnchorAlt: c.From, Pending: true, KeyStore: h})
				continue
			}
			m[c.VMID] = h
		}
	}
	if !hit {
		return nil
	}
	if len(diffs) > 0 {
		return fmt.Errorf("settle anchor: %w", &AnchorMismatchError{File: a.cfg.path(), Keys: filepath.Join(a.cfg.Dir, "keys"), Diffs: diffs})
	}
	next := a.file
	next.Holdings = sortedHoldings(m)
	next.Pending = keep
	if err := a.save(next); err != nil {
		return fmt.Errorf("settle anchor: %w", err)
	}
	a.file = next
	return nil
}
