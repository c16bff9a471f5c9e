package evacuate

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
)

// Outcomes that only the report has (a VM the runner never handed to the
// Mover).
const (
	OutcomePlanned  Outcome = "planned"  // dry run: it would go to Dest
	OutcomeSkipped  Outcome = "skipped"  // not this evacuation's to move (already moved, not running here, unknown)
	OutcomeRefused  Outcome = "refused"  // its destination was refused by attestation and no other host could take it
	OutcomeUnplaced Outcome = "unplaced" // no eligible host had room for it
)

// Exit codes of vtpmctl evacuate (docs/evacuation.md has the table).
const (
	ExitOK          = 0   // every VM left the source (or was already gone)
	ExitError       = 1   // the evacuation could not run (registry, input, ...)
	ExitRefused     = 2   // some VMs have no trusted destination with room; they run on the source; nothing failed
	ExitFailed      = 3   // some migrations failed and were rolled back; those VMs run on the source
	ExitOpen        = 4   // some VMs were left open by a crash or a cut; recovery settles them
	ExitBusy        = 5   // another evacuation of this host is running
	ExitInterrupted = 130 // stopped by the operator; run the same command again to continue
)

// VMReport is one VM's line in the report.
type VMReport struct {
	VM         string  `json:"vm"`
	Name       string  `json:"name,omitempty"`
	Outcome    Outcome `json:"outcome"`
	Dest       string  `json:"dest,omitempty"` // the destination planned or moved to
	Host       string  `json:"host,omitempty"` // where the VM runs now (empty when unknown: open)
	Generation uint64  `json:"generation,omitempty"`
	Rule       string  `json:"rule,omitempty"`
	Detail     string  `json:"detail,omitempty"`
	TxID       string  `json:"tx,omitempty"`
	Bytes      uint64  `json:"bytes,omitempty"`
	ElapsedMS  int64   `json:"elapsed_ms,omitempty"`
	// Earlier marks a VM an earlier run of this evacuation moved.
	Earlier bool `json:"earlier,omitempty"`
}

// Report is what an evacuation did.
type Report struct {
	Source      string          `json:"source"`
	DryRun      bool            `json:"dry_run,omitempty"`
	Resumed     bool            `json:"resumed,omitempty"`
	Interrupted bool            `json:"interrupted,omitempty"`
	Run         int             `json:"run,omitempty"` // 1 for the first run, 2 for the first resume, ...
	State       RecordState     `json:"state,omitempty"`
	VMs         []VMReport      `json:"vms"`      // sorted by VM ID
	Excluded    []ExcludedHost  `json:"excluded"` // hosts taken out during the run
	Counts      map[Outcome]int `json:"counts"`
	ElapsedMS   int64           `json:"elapsed_ms"`
	ExitCode    int             `json:"exit_code"`
	Plan        *Plan           `json:"-"`
}

func (r *Report) finalize(elapsed time.Duration) {
	slices.SortFunc(r.VMs, func(a, b VMReport) int { return cmp.Compare(a.VM, b.VM) })
	slices.SortFunc(r.Excluded, func(a, b ExcludedHost) int { return cmp.Compare(a.Host, b.Host) })
	r.Counts = map[Outcome]int{}
	for _, v := range r.VMs {
		r.Counts[v.Outcome]++
	}
	r.ElapsedMS = elapsed.Milliseconds()
	r.ExitCode = ReportExitCode(r)
}

// ReportExitCode derives the exit code from the report's counts: the most
// urgent outcome wins (open, failed, interrupted, refused or no room).
func ReportExitCode(r *Report) int {
	c := r.Counts
	switch {
	case c[OutcomeOpen] > 0:
		return ExitOpen
	case c[OutcomeFailed] > 0:
		return ExitFailed
	case r.Interrupted || c[OutcomeNotStarted] > 0:
		return ExitInterrupted
	case c[OutcomeRefused] > 0 || c[OutcomeUnplaced] > 0:
		return ExitRefused
	}
	return ExitOK
}

// ExitCode maps the outcome of Run to vtpmctl's exit code: the report's
// code, ExitBusy when another evacuation holds the host, ExitError for any
// other error without a report.
func ExitCode(rep *Report, err error) int {
	switch {
	case errors.Is(err, ErrBusy):
		return ExitBusy
	case rep == nil && (errors.Is(err, ErrStopped) || errors.Is(err, context.Canceled)):
		return ExitInterrupted
	case rep != nil && rep.ExitCode != ExitOK:
		return rep.ExitCode
	case err != nil:
		return ExitError
	case rep != nil:
		return rep.ExitCode
	}
	return ExitOK
}

// WriteText writes the report as a table, one line per VM, then the hosts
// taken out and a summary line.
func (r *Report) WriteText(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "VM\tNAME\tOUTCOME\tRUNS ON\tGEN\tDETAIL")
	for _, v := range r.VMs {
		gen := ""
		if v.Generation > 0 {
			gen = fmt.Sprint(v.Generation)
		}
		host := v.Host
		if host == "" {
			host = "?"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", v.VM, v.Name, v.Outcome, host, gen, v.detail())
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, x := range r.Excluded {
		fmt.Fprintf(w, "host %s left out: %s\n", x.Host, exclusionText(x))
	}
	var parts []string
	for _, o := range []Outcome{OutcomePlanned, OutcomeMoved, OutcomeSkipped, OutcomeRefused, OutcomeUnplaced, OutcomeFailed, OutcomeOpen, OutcomeNotStarted} {
		if n := r.Counts[o]; n > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", n, o))
		}
	}
	if len(parts) == 0 {
		parts = []string{"no VM to move"}
	}
	_, err := fmt.Fprintf(w, "evacuation of %s: %s in %s (exit %d)\n", r.Source, strings.Join(parts, ", "),
		time.Duration(r.ElapsedMS)*time.Millisecond, r.ExitCode)
	return err
}

func (v VMReport) detail() string {
	var s []string
	switch v.Outcome {
	case OutcomeMoved:
		s = append(s, "to "+v.Dest)
		if v.Earlier {
			s = append(s, "by an earlier run")
		}
	case OutcomePlanned:
		s = append(s, "to "+v.Dest)
	case OutcomeRefused:
		s = append(s, fmt.Sprintf("%s refused: rule %s", v.Dest, v.Rule))
	case OutcomeOpen:
		s = append(s, "transaction "+v.TxID)
	}
	if v.Detail != "" {
		s = append(s, v.Detail)
	}
	return strings.Join(s, "; ")
}

func exclusionText(x ExcludedHost) string {
	if x.Rule != "" {
		return fmt.Sprintf("%s (rule %s): %s", x.Reason, x.Rule, x.Detail)
	}
	return fmt.Sprintf("%s: %s", x.Reason, x.Detail)
}
