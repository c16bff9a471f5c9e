package audit

import (
	"errors"
	"fmt"

	"github.com/vtpmm/vtpmm/internal/errclass"
)

// Sentinel errors of package audit; test them with errors.Is.
var (
	// ErrTampered means the chain is broken: a record was edited, deleted,
	// inserted or reordered, or a line is not a canonical record.
	ErrTampered = errors.New("audit log tampered")
	// ErrTruncated means the last line is incomplete, as a crash in the
	// middle of an append leaves it. Open repairs it.
	ErrTruncated = errors.New("audit log truncated")
	// ErrInvalidRecord means Append was given a record it cannot log
	// (missing or malformed event, record too long).
	ErrInvalidRecord = errors.New("invalid audit record")
	// ErrInvalidOptions means Open was given unusable options.
	ErrInvalidOptions = errors.New("invalid audit log options")
	// ErrLocked means another Log (in this or another process) has the
	// file open for appending.
	ErrLocked = errors.New("audit log in use")
	// ErrClosed means the Log was closed.
	ErrClosed = errors.New("audit log closed")
	// ErrFailed means an earlier write or fsync failed; the file's tail is
	// uncertain, so the Log refuses further appends until it is reopened
	// (which verifies and repairs the tail).
	ErrFailed = errors.New("audit log failed")
	// ErrHistoryLost means the audit log is missing, empty or shorter than
	// the data directory says it was (its rollback anchor recorded a later
	// position). Class damaged (internal/errclass).
	ErrHistoryLost = errclass.Mark(errclass.Damaged, "audit log history lost")
)

// ChainError locates a defect found by Verify. It unwraps to ErrTampered,
// or to ErrTruncated for an incomplete last line.
type ChainError struct {
	Line   int    // 1-based line number
	Seq    uint64 // the record's seq as written; 0 when the line did not decode
	Reason string // what is wrong, for example "hash mismatch (edited?)"
	Err    error  // ErrTampered or ErrTruncated
}

func (e *ChainError) Error() string {
	switch {
	case e.Seq == 0:
		return fmt.Sprintf("line %d: %s", e.Line, e.Reason)
	case uint64(e.Line) == e.Seq:
		return fmt.Sprintf("record %d: %s", e.Seq, e.Reason)
	default:
		return fmt.Sprintf("record %d (line %d): %s", e.Seq, e.Line, e.Reason)
	}
}

// Unwrap returns ErrTampered or ErrTruncated.
func (e *ChainError) Unwrap() error { return e.Err }
