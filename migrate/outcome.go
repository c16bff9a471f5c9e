package migrate

import "github.com/vtpmm/vtpmm/internal/audit"

// Outcome is how a migration ended, for one VM (TxVM.Outcome) or for a
// whole migration (the metrics' result).
type Outcome string

// Outcomes.
const (
	OutcomeMigrated  Outcome = "migrated"  // source: the hypervisor moved the VM
	OutcomeFailed    Outcome = "failed"    // source: the hypervisor did not move it; or a migration failed before it
	OutcomeCommitted Outcome = "committed" // the destination owns the key
	OutcomeAborted   Outcome = "aborted"   // the source keeps the key
	OutcomeRefused   Outcome = "refused"   // the destination failed attestation (metrics)
)

// AuditEvent is one key release, refusal, commit, abort or enrolment, for
// the audit log.
type AuditEvent struct {
	Event      audit.Event
	VM         string
	Peer       string
	TxID       string
	Generation uint64
	Rule       string
	Detail     string
}
