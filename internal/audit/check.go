package audit

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
)

// ErrHistoryLost means the audit log is missing, empty or shorter than the
// data directory says it was (its rollback anchor recorded a later
// position). (Kept here rather than in errors.go while other work edits
// the package's existing files; move it there when merging.)
var ErrHistoryLost = errors.New("audit log history lost")

// Mark is a position of the log recorded outside it (vtpmd records it in
// its rollback anchor file, authenticated by the vault key): the number of
// records and the SHA-256 of the last of them (Log.Head).
type Mark struct {
	Seq  uint64
	Head string
}

// CheckOptions tunes Check.
type CheckOptions struct {
	// HadHistory says the data directory shows that this host committed
	// ownership changes, so its log cannot be missing or empty.
	HadHistory bool
	// Mark, when set, is a position the log must still reach, with the
	// same hash: a log cut back or rewritten below it is refused.
	Mark *Mark
}

// LogError says what is wrong with an audit log file, where, and what to
// do. It unwraps to ErrTampered, ErrTruncated or ErrHistoryLost.
type LogError struct {
	Path    string
	Line    int // 1-based; 0 when the problem is the whole file
	Problem string
	Fix     string
	Err     error
}

func (e *LogError) Error() string {
	at := ""
	if e.Line > 0 {
		at = fmt.Sprintf(" line %d", e.Line)
	}
	return fmt.Sprintf("audit log %s%s: %v: %s; %s", e.Path, at, e.Err, e.Problem, e.Fix)
}

// Unwrap returns the sentinel.
func (e *LogError) Unwrap() error { return e.Err }

const (
	fixTampered = "vtpmd does not continue a broken chain. Move the file aside and keep it as evidence;" +
		" restore the log from this host's backup, or start a new log after recording the incident"
	fixTruncated = "the last record belongs to an append that never completed (a crash); Open removes it and continues"
	fixLost      = "vtpmd does not start a new log over lost history. Restore the log from this host's backup;" +
		" if none exists, move what is left aside as evidence and start a new log after recording the incident"
)

// Check verifies the audit log at path before vtpmd opens it: the whole
// hash chain (an edited, inserted, deleted or reordered record is named by
// its line), an incomplete last line (ErrTruncated: Open repairs it),
// and, with opts, history: a missing or empty log when the host had
// history, or a log that no longer reaches opts.Mark with the same hash
// (records cut from the end, or the file rewritten), is ErrHistoryLost or
// ErrTampered. It never modifies the file.
func Check(path string, opts CheckOptions) (Summary, error) {
	hist := opts.HadHistory || (opts.Mark != nil && opts.Mark.Seq > 0)
	lost := func(format string, a ...any) error {
		return &LogError{Path: path, Problem: fmt.Sprintf(format, a...), Fix: fixLost, Err: ErrHistoryLost}
	}
	st, err := os.Lstat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if hist {
			return Summary{}, lost("the file does not exist, but this host had history")
		}
		return Summary{Last: Genesis}, nil
	case err != nil:
		return Summary{}, fmt.Errorf("check audit log %s: %w", path, err)
	case !st.Mode().IsRegular():
		return Summary{}, &LogError{Path: path, Problem: fmt.Sprintf("not a regular file (%v)", st.Mode().Type()), Fix: fixTampered, Err: ErrTampered}
	}
	f, err := os.Open(path)
	if err != nil {
		return Summary{}, fmt.Errorf("check audit log %s: %w", path, err)
	}
	defer f.Close()
	var markPrev string // the prev of the record after the mark: the mark's head
	sum, _, err := readChain(f, func(r Record) error {
		if opts.Mark != nil && r.Seq == opts.Mark.Seq+1 {
			markPrev = r.Prev
		}
		return nil
	})
	var ce *ChainError
	switch {
	case errors.As(err, &ce):
		fix := fixTampered
		if errors.Is(err, ErrTruncated) {
			fix = fixTruncated
		}
		lerr := &LogError{Path: path, Line: ce.Line, Problem: ce.Reason, Fix: fix, Err: ce.Err}
		if !errors.Is(err, ErrTruncated) {
			return sum, lerr
		}
		// A partial last line: the complete records before it still have
		// to reach the mark.
		if herr := checkMark(path, sum, markPrev, opts, hist); herr != nil {
			return sum, herr
		}
		return sum, lerr
	case err != nil:
		return sum, fmt.Errorf("check audit log %s: %w", path, err)
	}
	return sum, checkMark(path, sum, markPrev, opts, hist)
}

func checkMark(path string, sum Summary, markPrev string, opts CheckOptions, hist bool) error {
	lost := func(format string, a ...any) error {
		return &LogError{Path: path, Problem: fmt.Sprintf(format, a...), Fix: fixLost, Err: ErrHistoryLost}
	}
	if sum.Records == 0 && hist {
		return lost("the log holds no record, but this host had history")
	}
	m := opts.Mark
	if m == nil || m.Seq == 0 {
		return nil
	}
	if uint64(sum.Records) < m.Seq {
		return lost("the log holds %d records, the anchor recorded %d (records removed from the end?)", sum.Records, m.Seq)
	}
	head := markPrev
	if uint64(sum.Records) == m.Seq {
		head = sum.Last
	}
	if head != m.Head {
		return &LogError{Path: path, Line: int(m.Seq), Fix: fixTampered, Err: ErrTampered,
			Problem: fmt.Sprintf("record %d hashes to %.16s…, the anchor recorded %.16s… (the log was rewritten)", m.Seq, head, m.Head)}
	}
	return nil
}
