package vtpm

import (
	"context"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2/transport"
)

// AnchorAcceptance is an operator's decision to accept the data directory
// as it is after a refusal (a rollback, a mismatch, a missing or damaged
// anchor file), once every VM's owner was confirmed with the registry or
// the peers.
type AnchorAcceptance struct {
	Operator string // who decided (required)
	Reason   string // why, for the audit log (required)
	// Audit records the acceptance before the file is rewritten (required):
	// an acceptance that could not be audited does not happen.
	Audit func(ctx context.Context, r AnchorAcceptRecord) error
}

// AnchorAcceptRecord is what an acceptance changed, for the audit log.
type AnchorAcceptRecord struct {
	File     string
	Index    string
	Operator string
	Reason   string
	// OldCounter is what the file recorded (0 with OldProblem set when it
	// could not be read); TPMCounter is what the file records afterwards.
	OldCounter uint64
	OldProblem string
	TPMCounter uint64
	// Diffs are the VMs the key store holds differently from the old record
	// (empty when the old file could not be read).
	Diffs    []HoldingDiff
	Holdings int // VMs held after the acceptance
}

func (r AnchorAcceptRecord) String() string {
	s := fmt.Sprintf("anchor accepted by %s (%s): %s counter %d -> %d (TPM), %d VMs held, %d differed from the record",
		r.Operator, r.Reason, r.File, r.OldCounter, r.TPMCounter, r.Holdings, len(r.Diffs))
	if r.OldProblem != "" {
		s += "; the old file: " + r.OldProblem
	}
	return s
}

// AcceptAnchorState is the explicit, audited recovery: it resets the anchor
// file to the TPM's current counter and to the key store's current facts
// (unsettled steps are dropped). It works when the file is missing or
// damaged too. Cost: one NV_Read. The index must exist and be this vault's
// (otherwise use InitAnchor, with Replace for another vault's index).
func AcceptAnchorState(ctx context.Context, tpm transport.TPM, v *Vault, cfg AnchorConfig, facts Facts, acc AnchorAcceptance) (*Anchor, AnchorAcceptRecord, error) {
	cfg = cfg.withDefaults()
	if acc.Operator == "" || acc.Reason == "" || acc.Audit == nil {
		return nil, AnchorAcceptRecord{}, fmt.Errorf("accept anchor state: %w", ErrAcceptIncomplete)
	}
	if err := checkFacts(facts); err != nil {
		return nil, AnchorAcceptRecord{}, fmt.Errorf("accept anchor state: %w", err)
	}
	a, err := newAnchor(tpm, v, cfg)
	if err != nil {
		return nil, AnchorAcceptRecord{}, fmt.Errorf("accept anchor state: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return nil, AnchorAcceptRecord{}, err
	}
	rec := AnchorAcceptRecord{File: cfg.path(), Index: fmt.Sprintf("0x%08x", uint32(cfg.Index)), Operator: acc.Operator, Reason: acc.Reason}
	old, ferr := readAnchorFile(cfg.path(), a.keyID, a.macKey)
	var afe *AnchorFileError
	switch {
	case ferr == nil:
		rec.OldCounter = old.Counter
		rec.Diffs = compareFacts(old, facts)
	case errors.As(ferr, &afe):
		rec.OldProblem = afe.Problem
		old = anchorFile{}
	default:
		return nil, AnchorAcceptRecord{}, fmt.Errorf("accept anchor state: %w", ferr)
	}
	n, err := a.nv.read()
	if err != nil {
		return nil, AnchorAcceptRecord{}, fmt.Errorf("accept anchor state: %w", err)
	}
	rec.TPMCounter = n
	f := anchorFile{
		Version: anchorFileVersion, KeyID: a.keyID, Index: rec.Index, NVName: fmt.Sprintf("%x", a.nv.name.Buffer),
		Counter: n, Advances: old.Advances, Holdings: sortedHoldings(holdingMap(facts.Holdings)),
		Audit: old.Audit, Created: old.Created,
	}
	if f.Created.IsZero() {
		f.Created = cfg.Now().UTC()
	}
	rec.Holdings = len(f.Holdings)
	if err := acc.Audit(ctx, rec); err != nil {
		return nil, AnchorAcceptRecord{}, fmt.Errorf("accept anchor state: audit: %w", err)
	}
	a.mark = f.Audit
	if err := a.save(f); err != nil {
		return nil, AnchorAcceptRecord{}, fmt.Errorf("accept anchor state: %w", err)
	}
	a.file = f
	return a, rec, nil
}
