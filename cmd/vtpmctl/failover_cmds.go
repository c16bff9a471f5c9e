package main

import (
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/internal/errclass"
)

// Standby replicas and failover (issue 15, docs/failover.md): 'vtpmctl vm
// standby' assigns a VM's standbys in the fleet registry (the owner's
// vtpmd sends them replicas), 'vtpmctl failover' promotes the local
// standby's replica once the operator has fenced the old owner.

// standbyCommand is 'vm standby VM --on H1[,H2] --off H'.
func standbyCommand(e *env, client func() *adminapi.Client) *cobra.Command {
	var on, off []string
	var asJSON bool
	c := &cobra.Command{
		Use:   "standby VM [--on H1[,H2]] [--off H]",
		Short: "Assign or remove a VM's standby hosts (its owner sends each an attested replica)",
		Long: "standby records HOSTs as standbys of VM in the fleet registry (--on) or removes them (--off).\n" +
			"The VM's owner then attests each standby (the migration's policy; one attestation per pair\n" +
			"while fresh), sends it the VM key wrapped for the standby's migration key and the vTPM state,\n" +
			"and refreshes it when the state changes (standby.max_lag). A standby never starts the VM from\n" +
			"its replica; a failover promotes it. A standby that fails attestation is dropped. Without\n" +
			"flags it lists the standbys.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			set, err := client().Standby(cmd.Context(), adminapi.StandbyRequest{VM: args[0], On: splitHosts(on), Off: splitHosts(off)})
			if err != nil {
				return &exitError{code: errclass.ExitCode(err), err: err}
			}
			if asJSON {
				return json.NewEncoder(e.stdout).Encode(set)
			}
			fmt.Fprintf(e.stdout, "VM %s: owner %s at generation %d\n", set.VM, set.Owner, set.Generation)
			return printStandbys(e.stdout, set.Standbys)
		},
	}
	c.Flags().StringSliceVar(&on, "on", nil, "hosts to make standbys (comma-separated)")
	c.Flags().StringSliceVar(&off, "off", nil, "standby hosts to remove (their replicas are dropped)")
	c.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return c
}

func splitHosts(in []string) []string {
	var out []string
	for _, h := range in {
		if h = strings.TrimSpace(h); h != "" {
			out = append(out, h)
		}
	}
	return out
}

func printStandbys(w io.Writer, sbs []adminapi.StandbyInfo) error {
	if len(sbs) == 0 {
		fmt.Fprintln(w, "no standbys")
		return nil
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "STANDBY\tGENERATION\tCURRENT\tREPLICA AGE")
	for _, s := range sbs {
		age := "-"
		if s.Generation != 0 {
			age = s.Age.Round(time.Second).String()
		}
		fmt.Fprintf(tw, "%s\t%d\t%v\t%s\n", s.Host, s.Generation, s.Current, age)
	}
	return tw.Flush()
}

// failoverCommand is 'failover VM --to H --confirm-fenced OLD'.
func failoverCommand(e *env, client func() *adminapi.Client) *cobra.Command {
	var to string
	var confirm []string
	var noStart, asJSON bool
	c := &cobra.Command{
		Use:   "failover VM --to HOST [--confirm-fenced OLD] [--no-start]",
		Short: "Promote HOST's standby replica of VM (run on HOST) after its owner was fenced",
		Long: "failover asks the local vtpmd (which must be HOST, a standby of VM) to promote its replica:\n" +
			"every host that may run the VM (the owner, and an open migration's destination) must be\n" +
			"fenced first: by the configured fence agent (standby.fence.command, once the host's lease\n" +
			"is gone), or by you: --confirm-fenced OLD says you powered OLD off. Then one compare-and-swap\n" +
			"in the registry gives HOST the VM at a new generation, and vtpmd defines its secret and\n" +
			"starts it (--no-start: leaves the start to the cloud's HA manager). Without quorum nothing\n" +
			"happens. Exit codes: 0 promoted; 2 refused (not fenced, owner live, stale replica, another\n" +
			"standby won); 6 registry unavailable; 1 anything else.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if to == "" {
				return fmt.Errorf("failover: --to HOST is required (the standby that takes the VM; run this on it)")
			}
			rep, err := client().Failover(cmd.Context(), adminapi.FailoverRequest{VM: args[0], To: to, ConfirmFenced: splitHosts(confirm), NoStart: noStart})
			if err != nil {
				return &exitError{code: errclass.ExitCode(err), err: err}
			}
			if asJSON {
				return json.NewEncoder(e.stdout).Encode(rep)
			}
			started := "started"
			if !rep.Started {
				started = "not started (--no-start)"
			}
			fmt.Fprintf(e.stdout, "VM %s: %s took it over from %s at generation %d (fenced %s); fence %s, promote %s, start %s; %s\n",
				rep.VM, rep.Host, rep.From, rep.Generation, strings.Join(rep.Fenced, ","), rep.Fence.Round(time.Millisecond),
				rep.Promote.Round(time.Millisecond), rep.Start.Round(time.Millisecond), started)
			return nil
		},
	}
	c.Flags().StringVar(&to, "to", "", "the standby that takes the VM (this host)")
	c.Flags().StringSliceVar(&confirm, "confirm-fenced", nil, "hosts you have fenced (powered off); no fence agent runs for them")
	c.Flags().BoolVar(&noStart, "no-start", false, "promote only; the cloud's HA manager starts the VM")
	c.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return c
}
