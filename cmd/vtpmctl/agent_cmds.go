package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/vtpmm/vtpmm/internal/agent"
	"github.com/vtpmm/vtpmm/internal/audit"
)

// Exit codes of 'vtpmctl migrate' (exitRefused, 2, is shared with the
// attestation commands: the destination failed attestation, nothing left
// this host).
const (
	exitAborted    = 3 // the migration failed and was rolled back; the VM runs here
	exitUnresolved = 4 // a crash or cut left it open; vtpmd finishes it (see vm show)
	exitBusy       = 5 // another migration of the VM is in progress
)

// adminClient talks to the local vtpmd over its admin socket.
type adminClient struct {
	socket string
	http   *http.Client
}

func newAdminClient(socket string) *adminClient {
	return &adminClient{socket: socket, http: &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
	}}}
}

func (c *adminClient) do(ctx context.Context, method, path string, body any) (*http.Response, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://vtpmd"+path, rd)
	if err != nil {
		return nil, err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("%w at %s (is it running? --socket): %w", errUnreachable, c.socket, err)
	}
	if resp.StatusCode >= 300 {
		defer resp.Body.Close()
		var e struct{ Error string }
		_ = json.NewDecoder(resp.Body).Decode(&e)
		return nil, fmt.Errorf("vtpmd: %s", e.Error)
	}
	return resp, nil
}

func (c *adminClient) get(ctx context.Context, path string, v any) error {
	resp, err := c.do(ctx, http.MethodGet, path, nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	return json.NewDecoder(resp.Body).Decode(v)
}

func agentCommands(e *env) []*cobra.Command {
	var socket string
	client := func() *adminClient { return newAdminClient(socket) }
	addSocket := func(c *cobra.Command) *cobra.Command {
		c.PersistentFlags().StringVar(&socket, "socket", "/run/vtpmm/vtpmd.sock", "vtpmd admin socket")
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
			resp, err := client().do(cmd.Context(), http.MethodPost, "/v1/migrate", agent.MigrateRequest{VMs: args, To: to})
			if err != nil {
				return err
			}
			defer resp.Body.Close()
			start := time.Now()
			sc := bufio.NewScanner(resp.Body)
			sc.Buffer(make([]byte, 1<<20), 1<<20)
			for sc.Scan() {
				var ev agent.MigrateEvent
				if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
					return fmt.Errorf("migrate: bad progress line: %w", err)
				}
				if !ev.Done {
					fmt.Fprintf(e.stdout, "%7.3fs  %-10s %s\n", time.Since(start).Seconds(), ev.Phase, ev.Detail)
					continue
				}
				if asJSON {
					_ = json.NewEncoder(e.stdout).Encode(ev)
				}
				return migrateOutcome(e, ev, start)
			}
			return fmt.Errorf("migrate: vtpmd closed the stream early: %v", sc.Err())
		},
	}
	mig.Flags().StringVar(&to, "to", "", "destination host")
	mig.Flags().BoolVar(&asJSON, "json", false, "also print the result as JSON")

	vm := &cobra.Command{Use: "vm", Short: "Inspect the VMs of the local vtpmd"}
	vm.AddCommand(&cobra.Command{
		Use: "list", Short: "List VMs: owner, generation, hypervisor state", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var vms []agent.VMInfo
			if err := client().get(cmd.Context(), "/v1/vms", &vms); err != nil {
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
			var v agent.VMInfo
			if err := client().get(cmd.Context(), "/v1/vms/"+url.PathEscape(args[0]), &v); err != nil {
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
			resp, err := client().do(cmd.Context(), http.MethodPost, "/v1/hosts/"+url.PathEscape(args[0])+"/enroll", struct{}{})
			if err != nil {
				return err
			}
			defer resp.Body.Close()
			var info agent.EnrollInfo
			if err := json.NewDecoder(resp.Body).Decode(&info); err != nil {
				return err
			}
			if info.Code != "ok" {
				if info.Code == "refused" {
					return &exitError{code: exitRefused, err: errors.New(info.Error)}
				}
				return errors.New(info.Error)
			}
			fmt.Fprintf(e.stdout, "%s enrolled: EK %s…, AK %s…\nEK certificate path:\n%s", info.Host, info.EKDigest[:16], info.AKName[:16], indentLines(info.EKChain))
			return nil
		},
	})
	host.AddCommand(&cobra.Command{
		Use: "list", Short: "List this host and its peers, with reachability over mTLS", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var hosts []agent.HostInfo
			if err := client().get(cmd.Context(), "/v1/hosts", &hosts); err != nil {
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
	out := []*cobra.Command{addSocket(mig), addSocket(vm), addSocket(host)}
	return out
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
		e := &env{stdout: cmd.OutOrStdout()}
		{
			var resp struct {
				Records []audit.Record `json:"records"`
				Total   int            `json:"total"`
				Head    string         `json:"head"`
				Chain   string         `json:"chain"`
			}
			q := url.Values{}
			if vmFilter != "" {
				q.Set("vm", vmFilter)
			}
			if eventFilter != "" {
				q.Set("event", eventFilter)
			}
			if err := newAdminClient(socket).get(cmd.Context(), "/v1/audit?"+q.Encode(), &resp); err != nil {
				return err
			}
			w := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "SEQ\tTIME\tEVENT\tVM\tPEER\tGEN\tRULE\tDETAIL")
			for _, r := range resp.Records {
				fmt.Fprintf(w, "%d\t%s\t%s\t%s\t%s\t%d\t%s\t%s\n", r.Seq, r.Time.Format(time.RFC3339), r.Event, r.VM, r.Peer, r.Generation, orDash(r.Rule), r.Detail)
			}
			_ = w.Flush()
			fmt.Fprintf(e.stdout, "%d records, chain %s, head %s\n", resp.Total, resp.Chain, resp.Head)
			if resp.Chain != "intact" {
				return &exitError{code: 2, err: errors.New("audit chain broken: " + resp.Chain)}
			}
			return nil
		}
	}
	aud.Flags().StringVar(&socket, "socket", "/run/vtpmm/vtpmd.sock", "vtpmd admin socket")
	aud.Flags().StringVar(&vmFilter, "vm", "", "only this VM (UUID)")
	aud.Flags().StringVar(&eventFilter, "event", "", "only this event")
}

func migrateOutcome(e *env, ev agent.MigrateEvent, start time.Time) error {
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
	err := errors.New(strings.TrimSpace(ev.Error))
	switch ev.Code {
	case "ok":
		return nil
	case "refused":
		return &exitError{code: exitRefused, err: err}
	case "aborted":
		return &exitError{code: exitAborted, err: err}
	case "unresolved":
		return &exitError{code: exitUnresolved, err: err}
	case "busy":
		return &exitError{code: exitBusy, err: err}
	}
	return err
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
