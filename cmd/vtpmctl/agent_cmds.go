package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/internal/errclass"
)

// agentCommands are the commands that talk to the local vtpmd through its
// admin API (internal/adminapi). 'vtpmctl migrate' exits with the code of
// the migration's end (errclass): 0 migrated, 2 refused by attestation,
// 3 failed and rolled back, 4 left open, 5 busy, 1 anything else.
func agentCommands(e *env) []*cobra.Command {
	var socket string
	client := func() *adminapi.Client { return adminapi.NewClient(socket) }
	addSocket := func(c *cobra.Command) *cobra.Command {
		c.PersistentFlags().StringVar(&socket, "socket", adminapi.DefaultSocket, "vtpmd admin socket")
		return c
	}
	var to string
	var asJSON bool
	mig := &cobra.Command{
		Use:   "migrate VM... --to HOST",
		Short: "Live-migrate VMs with their vTPMs to an attested host",
		Long: "migrate asks the local vtpmd to attest HOST, hand it the VMs' vTPM keys wrapped for its TPM,\n" +
			"live-migrate the VMs and commit. Exit codes: 0 migrated; 2 refused by attestation (nothing\n" +
			"left this host); 3 failed and rolled back (the VM runs here); 4 left open by a crash or a\n" +
			"network cut (vtpmd finishes it; see 'vtpmctl vm show'); 5 another migration holds the VM.",
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if to == "" {
				return fmt.Errorf("migrate: --to HOST is required")
			}
			start := time.Now()
			end, err := client().Migrate(cmd.Context(), adminapi.MigrateRequest{VMs: args, To: to}, func(ev adminapi.MigrateEvent) {
				fmt.Fprintf(e.stdout, "%7.3fs  %-10s %s\n", time.Since(start).Seconds(), ev.Phase, ev.Detail)
			})
			if !end.Done {
				return err // the request itself failed
			}
			if asJSON {
				_ = json.NewEncoder(e.stdout).Encode(end)
			}
			printOutcome(e, end, start)
			if err != nil {
				return &exitError{code: errclass.ExitCode(err), err: err}
			}
			return nil
		},
	}
	mig.Flags().StringVar(&to, "to", "", "destination host")
	mig.Flags().BoolVar(&asJSON, "json", false, "also print the result as JSON")

	vm := &cobra.Command{Use: "vm", Short: "Inspect the VMs of the local vtpmd"}
	vm.AddCommand(&cobra.Command{
		Use: "list", Short: "List VMs: owner, generation, hypervisor state", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			vms, err := client().VMs(cmd.Context())
			if err != nil {
				return err
			}
			w := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "NAME\tUUID\tOWNED\tGENERATION\tSTATE\tPENDING")
			for _, v := range vms {
				fmt.Fprintf(w, "%s\t%s\t%v\t%d\t%s\t%s\n", orDash(v.Name), v.UUID, v.Owned, v.Generation, v.State, orDash(v.PendingTx))
			}
			return w.Flush()
		},
	}, &cobra.Command{
		Use: "show VM", Short: "Show a VM and the transactions that touched it", Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			v, err := client().VM(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			fmt.Fprintf(e.stdout, "name:        %s\nuuid:        %s\nowned here:  %v\ngeneration:  %d\nstate:       %s\n",
				orDash(v.Name), v.UUID, v.Owned, v.Generation, v.State)
			if v.PendingTx != "" {
				fmt.Fprintf(e.stdout, "pending:     transaction %s\n", v.PendingTx)
			}
			for _, tx := range v.Transactions {
				fmt.Fprintf(e.stdout, "tx %s  %-11s peer %-10s %-13s %s %s\n", tx.ID, tx.Role, tx.Peer, tx.State, tx.Updated.Format(time.RFC3339), tx.Reason)
			}
			return nil
		},
	})
	host := &cobra.Command{Use: "host", Short: "Inspect and enrol the hosts the local vtpmd knows"}
	host.AddCommand(&cobra.Command{
		Use:   "enroll HOST",
		Short: "Verify HOST's EK certificate, activate its AK against its EK, and record the enrolment",
		Long: "enroll asks the local vtpmd to fetch HOST's TPM identity over the agent wire, verify its EK\n" +
			"certificate against attestation.roots, challenge its TPM with TPM2_ActivateCredential and,\n" +
			"when the TPM answers, record (EK, AK) in attestation.enrollments. Evidence from a host\n" +
			"whose AK is not enrolled is refused (rule ak-activation). Exit 2 when HOST is refused.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			info, err := client().Enroll(cmd.Context(), args[0])
			if errors.Is(err, errclass.Refused) {
				return &exitError{code: exitRefused, err: err}
			}
			if err != nil {
				return &exitError{code: 1, err: err}
			}
			fmt.Fprintf(e.stdout, "%s enrolled: EK %s…, AK %s…\nEK certificate path:\n%s", info.Host, info.EKDigest[:16], info.AKName[:16], indentLines(info.EKChain))
			return nil
		},
	})
	host.AddCommand(&cobra.Command{
		Use: "list", Short: "List this host and its peers, with reachability over mTLS", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			hosts, err := client().Hosts(cmd.Context())
			if err != nil {
				return err
			}
			w := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "HOST\tADDRESS\tREACHABLE\tNOTE")
			for _, h := range hosts {
				note := h.Error
				if h.Self {
					note = "this host"
				}
				fmt.Fprintf(w, "%s\t%s\t%v\t%s\n", h.Host, h.Address, h.Reachable, note)
			}
			return w.Flush()
		},
	})
	return []*cobra.Command{addSocket(mig), addSocket(vm), addSocket(host)}
}

// withLocalAudit makes 'vtpmctl audit' (no subcommand) show the local
// vtpmd's audit log through its admin socket.
func withLocalAudit(aud *cobra.Command) {
	var socket, vmFilter, eventFilter string
	aud.Args = cobra.NoArgs
	aud.Long = "Without a subcommand, audit shows the local vtpmd's audit log (key releases, refusals,\n" +
		"commits and aborts) and whether its hash chain is intact. 'audit verify FILE' and\n" +
		"'audit show FILE' read a copy of a log file."
	aud.RunE = func(cmd *cobra.Command, _ []string) error {
		out := cmd.OutOrStdout()
		log, err := adminapi.NewClient(socket).Audit(cmd.Context(), vmFilter, eventFilter)
		if err != nil {
			return err
		}
		w := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
		fmt.Fprintln(w, "SEQ\tTIME\tEVENT\tVM\tPEER\tGEN\tRULE\tDETAIL")
		for _, r := range log.Records {
			fmt.Fprintf(w, "%d\t%s\t%s\t%s\t%s\t%d\t%s\t%s\n", r.Seq, r.Time.Format(time.RFC3339), r.Event, r.VM, r.Peer, r.Generation, orDash(r.Rule), r.Detail)
		}
		_ = w.Flush()
		fmt.Fprintf(out, "%d records, chain %s, head %s\n", log.Total, log.Chain, log.Head)
		if log.Chain != adminapi.ChainIntact {
			return &exitError{code: 2, err: errors.New("audit chain broken: " + log.Chain)}
		}
		return nil
	}
	aud.Flags().StringVar(&socket, "socket", adminapi.DefaultSocket, "vtpmd admin socket")
	aud.Flags().StringVar(&vmFilter, "vm", "", "only this VM (UUID)")
	aud.Flags().StringVar(&eventFilter, "event", "", "only this event")
}

// printOutcome prints what a migration's end event reports.
func printOutcome(e *env, ev adminapi.MigrateEvent, start time.Time) {
	took := time.Since(start).Seconds()
	if ev.Result != nil && len(ev.Result.Committed) > 0 {
		mode := "cold"
		if ev.Result.Warm {
			mode = "warm"
		}
		fmt.Fprintf(e.stdout, "%7.3fs  done       %d VM(s) migrated (tx %s, %s attestation, %d+%d round trips)\n",
			took, len(ev.Result.Committed), ev.Result.TxID, mode, ev.Result.RoundTrips.Before, ev.Result.RoundTrips.After)
	}
	if ev.Result != nil && len(ev.Result.Failed) > 0 {
		ids := make([]string, 0, len(ev.Result.Failed))
		for id := range ev.Result.Failed {
			ids = append(ids, id)
		}
		sort.Strings(ids)
		for _, id := range ids {
			fmt.Fprintf(e.stdout, "         failed     %s: %s\n", id, ev.Result.Failed[id])
		}
	}
}

func indentLines(s string) string {
	var b strings.Builder
	for _, l := range strings.Split(strings.TrimRight(s, "\n"), "\n") {
		b.WriteString("  " + l + "\n")
	}
	return b.String()
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
