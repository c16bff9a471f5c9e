package daemon

import (
	"context"
	"errors"
	"fmt"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/internal/audit"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/host"
)

// The daemon's part of the state checks at start (docs/anchor.md): the
// host (host.Open) checked the vault file, the key envelopes and the
// rollback anchor against the host TPM; the daemon checks its own files
// with the anchor's history before it opens them, so that a damaged file
// is refused with its name, what is wrong and what to do (never a crash),
// and a file that had history is never silently replaced by an empty one:
//
//   - the ledger (migrate.CheckLedger, before bbolt maps it);
//   - the audit log (audit.Check: the hash chain, and the position the
//     anchor recorded, so a log cut back or rewritten is refused; an
//     incomplete last line alone is what a crash leaves, and audit.Open
//     repairs it).
//
// The configuration was checked when it was loaded (LoadConfig), and the
// enrolment file is checked here too: a damaged one would refuse every
// peer later.

func (d *Daemon) checkFiles() error {
	a := d.host.Anchor()
	hist := a.Advances() > 0
	// A pending key is a transaction the ledger had open: its ledger had
	// history even before the first committed migration.
	ledgerHist := hist
	for _, c := range d.host.KeyChecks() {
		ledgerHist = ledgerHist || c.Pending != "" && c.Pending != "rekey"
	}
	if _, err := migrate.CheckLedger(d.cfg.Layout().Ledger(), migrate.LedgerCheckOptions{HadHistory: ledgerHist}); err != nil {
		return err
	}
	var mark *audit.Mark
	if m := a.AuditMark(); m != nil {
		mark = &audit.Mark{Seq: m.Seq, Head: m.Head}
	}
	if _, err := audit.Check(d.cfg.AuditLogPath(), audit.CheckOptions{HadHistory: hist, Mark: mark}); err != nil && !onlyTruncated(err) {
		return err
	}
	return nil
}

// checkEnrollments reads the enrolment store once: a damaged file is
// refused at start, naming it, not at the first peer's call.
func (d *Daemon) checkEnrollments(ctx context.Context) error {
	if d.enroll == nil {
		return nil
	}
	if _, ok := d.enroll.(regEnrollments); ok {
		// The registry's records: the registry checks them, and reading
		// them here would make the start wait for its quorum.
		return nil
	}
	if _, err := d.enroll.Activated(ctx, nil, nil); err != nil {
		return fmt.Errorf("start daemon: %w (fix or restore attestation.enrollments; it is JSON written by 'vtpmctl host enroll')", err)
	}
	return nil
}

// onlyTruncated: an incomplete last line, and nothing else, is what a
// crash during an append leaves; audit.Open removes it.
func onlyTruncated(err error) bool {
	return errors.Is(err, audit.ErrTruncated) && !errors.Is(err, audit.ErrTampered) && !errors.Is(err, audit.ErrHistoryLost)
}

// recordAuditMark writes the audit log's position into the anchor file
// (vtpmd does at start and at stop), so that a log cut back or replaced
// since is refused at the next start.
func (d *Daemon) recordAuditMark(ctx context.Context) {
	if d.audit == nil || d.host == nil || d.host.Anchor() == nil {
		return
	}
	seq, head := d.audit.Head()
	if err := d.host.Anchor().RecordAuditMark(ctx, vtpm.AuditMark{Seq: seq, Head: head}); err != nil {
		d.log.WithError(err).Warn("recording the audit log's position in the rollback anchor")
	}
}

// anchorAdapter is the migration node's view of the host's rollback
// anchor: each settled step records the audit log's position too.
type anchorAdapter struct {
	h   *host.Host
	log *audit.Log
}

var _ migrate.Anchor = anchorAdapter{}

func (a anchorAdapter) Advance(ctx context.Context, changes []vtpm.Change) (vtpm.AnchorTicket, error) {
	return a.h.Advance(ctx, changes)
}

func (a anchorAdapter) Settle(ctx context.Context, t vtpm.AnchorTicket) error {
	seq, head := a.log.Head()
	return a.h.Settle(ctx, t, &vtpm.AuditMark{Seq: seq, Head: head})
}

// auditRekey records a key rotation the host made at a VM's start.
func (d *Daemon) auditRekey(ctx context.Context, vm, why string) {
	if d.audit == nil {
		return
	}
	if err := d.audit.Append(ctx, audit.Record{Event: audit.EventRekey, VM: vm, Detail: why}); err != nil {
		d.log.WithError(err).WithFields(logrus.Fields{"vm": vm}).Error("audit log append failed")
	}
}
