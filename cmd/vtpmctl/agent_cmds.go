package main

import (
	"context"
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
// admin API (internal/adminapi), and the operator's commands on the fleet
// registry. 'vtpmctl migrate' exits with the code of the migration's end
// (errclass): 0 migrated, 2 refused (by attestation or the registry), 3
// failed and rolled back, 4 left open, 5 busy, 6 registry unavailable (no
// quorum: nothing moved), 1 anything else.
func agentCommands(e *env) []*cobra.Command {
	var socket string
	client := func() *adminapi.Client { return adminapi.NewClient(socket) }
	rf := &registryFlags{socket: &socket}
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
			"network cut (vtpmd finishes it; see 'vtpmctl vm show'); 5 another migration holds the VM;\n" +
			"6 the fleet registry has no quorum (nothing moved; the VM runs here).",
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

	vm := &cobra.Command{Use: "vm", Short: "Create and inspect VMs: the local vtpmd's, or the fleet's (--fleet)"}
	var fleetList, listJSON bool
	list := &cobra.Command{
		Use: "list [--fleet] [--json]", Short: "List VMs: this host's (owned, generation, hypervisor state) or, with --fleet, the fleet registry's", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if fleetList {
				return listFleetVMs(cmd.Context(), e, client(), listJSON)
			}
			vms, err := client().VMs(cmd.Context())
			if err != nil {
				return err
			}
			if listJSON {
				return json.NewEncoder(e.stdout).Encode(vms)
			}
			w := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "NAME\tUUID\tOWNED\tGENERATION\tSTATE\tPENDING\tNOTE")
			for _, v := range vms {
				note := "-"
				switch {
				case v.Damaged != "":
					note = "DAMAGED: " + v.Damaged
				case v.DomainOn != "":
					note = "domain and vTPM state on " + v.DomainOn + "; the key moves there once it is attested"
				case v.Rotate:
					note = "key rotates when the VM stops here"
				}
				fmt.Fprintf(w, "%s\t%s\t%v\t%d\t%s\t%s\t%s\n", orDash(v.Name), v.UUID, v.Owned, v.Generation, v.State, orDash(v.PendingTx), note)
			}
			return w.Flush()
		},
	}
	list.Flags().BoolVar(&fleetList, "fleet", false, "list every VM of the fleet registry: owner, generation, open migration, owner's state and liveness")
	list.Flags().BoolVar(&listJSON, "json", false, "print JSON")
	var createUUID string
	create := &cobra.Command{
		Use:   "create NAME [--uuid UUID]",
		Short: "Create a VM's vTPM on the local vtpmd: key, encrypted state, the registry's record, the hypervisor's secret",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			v, err := client().CreateVM(cmd.Context(), adminapi.CreateVMRequest{Name: args[0], UUID: createUUID})
			if err != nil {
				return &exitError{code: errclass.ExitCode(err), err: err}
			}
			fmt.Fprintf(e.stdout, "created vTPM for VM %s (%s), generation %d\n", v.Name, v.UUID, v.Generation)
			return nil
		},
	}
	create.Flags().StringVar(&createUUID, "uuid", "", "the VM's UUID (default: random)")
	vm.AddCommand(list, create, &cobra.Command{
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
			if v.DomainOn != "" {
				fmt.Fprintf(e.stdout, "apart:       the VM's domain and vTPM state are on %s; vtpmd moves the key there once it is attested\n", v.DomainOn)
			}
			for _, tx := range v.Transactions {
				fmt.Fprintf(e.stdout, "tx %s  %-11s peer %-10s %-13s %s %s\n", tx.ID, tx.Role, tx.Peer, tx.State, tx.Updated.Format(time.RFC3339), tx.Reason)
			}
			if v.Replica != nil {
				fmt.Fprintf(e.stdout, "replica:     this host is a standby (generation %d, received %s ago; never started from)\n", v.Replica.Generation, v.Replica.Age.Round(time.Second))
			}
			if len(v.Standbys) > 0 {
				return printStandbys(e.stdout, v.Standbys)
			}
			return nil
		},
	})
	vm.AddCommand(standbyCommand(e, client))
	vm.AddCommand(&cobra.Command{
		Use:   "rekey VM",
		Short: "Replace a shut-off VM's key and re-encrypt its vTPM state (a former holder's key opens nothing)",
		Long: "rekey asks the local vtpmd to replace the VM's key: a new random key, the VM's vTPM state\n" +
			"re-encrypted under it through swtpm (no plaintext state on disk), the hypervisor's secret\n" +
			"redefined. Every copy of the old key, on hosts that held the VM before, then opens nothing.\n" +
			"The VM must be owned here and shut off. vtpmd also rotates a VM's key by itself once the VM\n" +
			"first stopped here after a migration. Exit codes: 0 done; 5 the VM is running or in a migration;\n" +
			"7 its key envelope is damaged; 1 anything else (not owned here, unknown VM).",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			info, err := client().Rekey(cmd.Context(), args[0])
			if err != nil {
				return &exitError{code: errclass.ExitCode(err), err: err}
			}
			fmt.Fprintf(e.stdout, "VM %s: key replaced at generation %d; %d bytes of vTPM state re-encrypted in %s\n", info.UUID, info.Generation, info.Bytes, info.Took)
			return nil
		},
	})
	host := &cobra.Command{Use: "host", Short: "Enrol, list, drain and fence hosts (the fleet registry's, or the local vtpmd's peers)"}
	var enrollAddr string
	var enrollWait time.Duration
	enroll := &cobra.Command{
		Use:   "enroll HOST",
		Short: "Verify HOST's TPM (EK chain and AK activation, or its AK certificate) and record the enrolment",
		Long: "enroll asks the local vtpmd to fetch HOST's TPM identity over the agent wire, verify its EK\n" +
			"certificate against attestation.roots and challenge its TPM with TPM2_ActivateCredential (or,\n" +
			"when HOST presents an AK certificate and the policy allows it, verify that certificate).\n" +
			"With a fleet registry, HOST is enrolled once for the whole fleet: vtpmctl gives HOST its\n" +
			"registry user, waits for it to register, and writes the verified record to the registry\n" +
			"with the operator's certificate (--pki, --user); every host trusts it. Without one, the\n" +
			"local vtpmd records (EK, AK) in attestation.enrollments (every pair of hosts enrols).\n" +
			"Evidence from a host whose AK is not enrolled is refused (rule ak-activation). Exit 2 when\n" +
			"HOST is refused, 6 when the registry has no quorum.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			info, err := client().Registry(cmd.Context())
			if err == nil && info.Mode != "none" {
				return enrollInRegistry(cmd, e, rf, client(), args[0], enrollAddr, enrollWait)
			}
			einfo, err := client().EnrollWith(cmd.Context(), args[0], adminapi.EnrollRequest{Addr: enrollAddr})
			if errors.Is(err, errclass.Refused) {
				return &exitError{code: exitRefused, err: err}
			}
			if err != nil {
				return &exitError{code: 1, err: err}
			}
			fmt.Fprintf(e.stdout, "%s enrolled: EK %s…, AK %s…\nEK certificate path:\n%s", einfo.Host, einfo.EKDigest[:16], einfo.AKName[:16], indentLines(einfo.EKChain))
			return nil
		},
	}
	enroll.Flags().StringVar(&enrollAddr, "addr", "", "HOST's agent wire address, if it is not registered (nor a static peer)")
	enroll.Flags().DurationVar(&enrollWait, "wait", 60*time.Second, "how long to wait for HOST to register in the fleet registry")
	var hostsJSON bool
	hostList := &cobra.Command{
		Use: "list [--json]", Short: "List the fleet registry's hosts (state, liveness, enrolment), or this host's peers and their reachability", Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			hosts, err := client().Hosts(cmd.Context())
			if err != nil {
				return &exitError{code: errclass.ExitCode(err), err: err}
			}
			if hostsJSON {
				return json.NewEncoder(e.stdout).Encode(hosts)
			}
			return printHosts(e, hosts)
		},
	}
	hostList.Flags().BoolVar(&hostsJSON, "json", false, "print JSON")
	host.AddCommand(enroll, hostList)
	host.AddCommand(hostStateCommands(e, rf)...)
	host.AddCommand(retireCommand(e, rf))
	host.AddCommand(reenrollCommand(e, rf, client))
	rf.add(host)
	reg := registryCommands(e, &socket)
	evac := evacuateCommand(e, client, rf)
	return append([]*cobra.Command{addSocket(mig), addSocket(vm), addSocket(host), addSocket(reg), addSocket(evac),
		addSocket(failoverCommand(e, client))}, escrowCommands(e, &socket, &registryFlags{socket: &socket})...)
}

// printHosts prints 'host list': the registry's view when the hosts carry
// it, else the peers' reachability.
func printHosts(e *env, hosts []adminapi.HostInfo) error {
	registryView := false
	for _, h := range hosts {
		registryView = registryView || h.Registered || h.Enrolled || h.State != ""
	}
	w := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	if !registryView {
		fmt.Fprintln(w, "HOST\tADDRESS\tREACHABLE\tNOTE")
		for _, h := range hosts {
			note := h.Error
			if h.Self {
				note = "this host"
			}
			fmt.Fprintf(w, "%s\t%s\t%v\t%s\n", h.Host, h.Address, h.Reachable, note)
		}
		return w.Flush()
	}
	fmt.Fprintln(w, "HOST\tADDRESS\tSTATE\tLIVE\tENROLLED\tNOTE")
	for _, h := range hosts {
		enrolled := "no"
		if h.Enrolled {
			enrolled = fmt.Sprintf("%s by %s, %s", h.Method, orDash(h.EnrolledBy), h.EnrolledAt.Format(time.RFC3339))
		}
		var notes []string
		if h.Self {
			notes = append(notes, "this host")
		}
		if !h.Registered {
			notes = append(notes, "not registered")
		}
		if h.Error != "" {
			notes = append(notes, h.Error)
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%v\t%s\t%s\n", h.Host, orDash(h.Address), orDash(h.State), h.Live, enrolled, strings.Join(notes, "; "))
	}
	return w.Flush()
}

// listFleetVMs prints 'vm list --fleet'.
func listFleetVMs(ctx context.Context, e *env, c *adminapi.Client, asJSON bool) error {
	list, err := c.FleetVMs(ctx)
	if err != nil {
		return &exitError{code: errclass.ExitCode(err), err: err}
	}
	if asJSON {
		return json.NewEncoder(e.stdout).Encode(list)
	}
	w := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(w, "NAME\tUUID\tOWNER\tGENERATION\tMIGRATION\tOWNER STATE\tOWNER LIVE")
	for _, v := range list.VMs {
		mig := "-"
		if v.TxID != "" {
			mig = fmt.Sprintf("%s… to %s", v.TxID[:min(8, len(v.TxID))], v.TxTo)
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%s\t%s\t%v\n", orDash(v.Name), v.UUID, v.Owner, v.Generation, mig, orDash(v.OwnerState), v.OwnerLive)
	}
	if err := w.Flush(); err != nil {
		return err
	}
	if list.Stale {
		fmt.Fprintf(e.stdout, "(the registry has no quorum: this is the last view, at revision %d: %s)\n", list.Rev, list.Error)
	}
	return nil
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
		if reg := ev.Result.Registry; reg.RoundTrips > 0 {
			fmt.Fprintf(e.stdout, "         registry   %d etcd round trips, %.1f ms (%.1f%% of %.3fs)\n",
				reg.RoundTrips, float64(reg.Time.Microseconds())/1000, 100*reg.Time.Seconds()/took, took)
		}
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
