package main

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode"

	"github.com/spf13/cobra"

	"github.com/vtpmm/vtpmm/internal/audit"
)

// Exit codes of the audit commands: 1 for unusable input (missing file,
// bad flags), 2 when the chain is broken (tampering), 3 when only the last
// line is incomplete (a crash during an append; vtpmd repairs it when it
// next opens the log).
const (
	exitChainBroken    = 2
	exitChainTruncated = 3
)

// auditCommands returns the audit-log commands (audit verify, audit show).
func auditCommands(e *env) []*cobra.Command {
	a := &cobra.Command{Use: "audit", Short: "Inspect and verify the hash-chained audit log of a host"}
	a.AddCommand(auditVerifyCommand(e), auditShowCommand(e))
	return []*cobra.Command{a}
}

// chainExit maps a verification error to its exit code.
func chainExit(err error) error {
	switch {
	case errors.Is(err, audit.ErrTruncated):
		return &exitError{code: exitChainTruncated, err: fmt.Errorf("%w (vtpmd removes the incomplete line when it next opens the log)", err)}
	case errors.Is(err, audit.ErrTampered):
		return &exitError{code: exitChainBroken, err: err}
	}
	return err
}

func auditVerifyCommand(e *env) *cobra.Command {
	return &cobra.Command{
		Use:   "verify FILE",
		Short: "Verify every record's hash, prev link and seq (exit 2: broken chain, 3: incomplete last line)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			f, err := os.Open(args[0])
			if err != nil {
				return err
			}
			defer f.Close()
			sum, err := audit.Verify(f)
			if err != nil {
				return chainExit(fmt.Errorf("%s: %w", args[0], err))
			}
			fmt.Fprintf(e.stdout, "%d records, chain intact, head %s\n", sum.Records, sum.Last)
			return nil
		},
	}
}

func auditShowCommand(e *env) *cobra.Command {
	var vm, event string
	c := &cobra.Command{
		Use:   "show FILE",
		Short: "Print the verified records as a table (stops at a broken record, exit 2)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			f, err := os.Open(args[0])
			if err != nil {
				return err
			}
			defer f.Close()
			tw := tabwriter.NewWriter(e.stdout, 0, 0, 2, ' ', 0)
			fmt.Fprintln(tw, "SEQ\tTIME\tHOST\tEVENT\tVM\tPEER\tGEN\tRULE\tDETAIL")
			shown := 0
			_, verr := audit.Read(f, func(r audit.Record) error {
				if (vm != "" && r.VM != vm) || (event != "" && r.Event != audit.Event(event)) {
					return nil
				}
				shown++
				fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%d\t%s\t%s\n", r.Seq, r.Time.UTC().Format(time.RFC3339Nano),
					cell(r.Host), cell(string(r.Event)), cell(r.VM), cell(r.Peer), r.Generation, cell(r.Rule), cell(r.Detail))
				return nil
			})
			if err := tw.Flush(); err != nil {
				return err
			}
			if shown == 0 {
				fmt.Fprintln(e.stdout, "(no matching records)")
			}
			if verr != nil {
				return chainExit(fmt.Errorf("%s: %w; records after this point are not shown", args[0], verr))
			}
			return nil
		},
	}
	c.Flags().StringVar(&vm, "vm", "", "only records of this VM UUID")
	c.Flags().StringVar(&event, "event", "", "only records of this event (key-release, key-release-refused, migration-commit, migration-abort, ...)")
	return c
}

// cell renders a field for the table: "-" when empty, Go-quoted when it
// holds tabs, newlines, escape sequences or other non-graphic characters,
// so that log contents cannot break the table or drive the terminal.
func cell(s string) string {
	if s == "" {
		return "-"
	}
	if strings.ContainsFunc(s, func(r rune) bool { return !unicode.IsGraphic(r) || r == '\t' }) {
		return strconv.QuoteToGraphic(s)
	}
	return s
}
