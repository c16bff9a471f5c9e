package main

import (
	"context"
	"errors"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/vtpmm/vtpmm/internal/audit"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/host"
)

// anchorCmd is 'vtpmd anchor accept': the explicit, audited recovery after
// vtpmd refused to start because the data directory does not match the
// host TPM's rollback anchor (docs/anchor.md, "Recovery").
func anchorCmd(e *env) *cobra.Command {
	c := &cobra.Command{Use: "anchor", Short: "Recover from a rollback-anchor refusal (docs/anchor.md)"}
	var operator, reason string
	var historyLost bool
	accept := &cobra.Command{
		Use:   "accept --operator NAME --reason TEXT [--history-lost]",
		Short: "Accept this data directory as it is, after confirming every VM's owner (audited)",
		Long: "accept is the recovery after vtpmd refused to start with a rolled-back data directory, a\n" +
			"key store that does not match the anchor, or a missing or damaged anchor file. First make\n" +
			"sure this host no longer holds VMs that another host owns now (confirm every VM's owner with\n" +
			"the registry or the peers' 'vtpmctl vm list', and shred what it gave away). accept then records\n" +
			"the decision in the audit log (operator, reason, both counters, the VMs that differed) and\n" +
			"only then rewrites the anchor file to the host TPM's counter and the key store as it is.\n" +
			"--history-lost also accepts that the ledger or the audit log lost its history (moved aside\n" +
			"as damaged, or gone): vtpmd then starts them anew. vtpmd must not be running.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			if operator == "" || reason == "" {
				return fmt.Errorf("anchor accept: %w: --operator and --reason are required", vtpm.ErrAcceptIncomplete)
			}
			cfg, err := e.config()
			if err != nil {
				return err
			}
			log, err := audit.Open(cfg.AuditLogPath(), audit.Options{Host: cfg.HostID, Log: e.log})
			if err != nil {
				return fmt.Errorf("anchor accept: the acceptance must be audited: %w", err)
			}
			defer log.Close()
			acc := host.AcceptOptions{
				AnchorAcceptance: vtpm.AnchorAcceptance{
					Operator: operator, Reason: reason, ResetHistory: historyLost,
					Audit: func(ctx context.Context, r vtpm.AnchorAcceptRecord) error {
						return log.Append(ctx, audit.Record{Event: audit.EventAnchorAccept, Detail: r.String()})
					},
					Mark: func() *vtpm.AuditMark {
						seq, head := log.Head()
						return &vtpm.AuditMark{Seq: seq, Head: head}
					},
				},
				CheckHistory: func(hist bool, mark *vtpm.AuditMark) error {
					if _, err := migrate.CheckLedger(cfg.Layout().Ledger(), migrate.LedgerCheckOptions{HadHistory: hist}); err != nil {
						return err
					}
					var m *audit.Mark
					if mark != nil {
						m = &audit.Mark{Seq: mark.Seq, Head: mark.Head}
					}
					if _, err := audit.Check(cfg.AuditLogPath(), audit.CheckOptions{HadHistory: hist, Mark: m}); err != nil && !errors.Is(err, audit.ErrTruncated) {
						return err
					}
					return nil
				},
			}
			rec, err := host.AcceptAnchor(ctx, cfg.Config, e.opts(), acc)
			if err != nil {
				return err
			}
			fmt.Fprintf(e.stdout, "%s\n", rec)
			for _, d := range rec.Diffs {
				fmt.Fprintf(e.stdout, "  accepted: %s\n", d)
			}
			fmt.Fprintln(e.stdout, "the acceptance is in the audit log; start vtpmd")
			return nil
		},
	}
	accept.Flags().StringVar(&operator, "operator", "", "who accepts (recorded in the audit log)")
	accept.Flags().StringVar(&reason, "reason", "", "why, e.g. the ticket that confirmed every VM's owner (recorded)")
	accept.Flags().BoolVar(&historyLost, "history-lost", false, "also accept that the ledger or the audit log lost its history")
	c.AddCommand(accept)
	return c
}
