package main

import (
	"encoding/json"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/migrate/evacuate"
	"github.com/vtpmm/vtpmm/migrate/registry/operator"
)

// evacuateCommand is 'vtpmctl evacuate HOST': the local vtpmd (HOST's)
// runs the evacuation (migrate/evacuate) and streams its events, which
// this renders: one line per VM updating in place on a terminal, plain
// lines otherwise, NDJSON with --json. docs/evacuation.md.
func evacuateCommand(e *env, client func() *adminapi.Client, rf *registryFlags) *cobra.Command {
	var (
		req      adminapi.EvacuateRequest
		asJSON   bool
		headroom uint64
	)
	c := &cobra.Command{
		Use:   "evacuate HOST [--to H1,H2,...] [--parallel N] [--dry-run] [--json]",
		Short: "Move every vTPM VM off HOST to attested hosts (before maintenance); run it on HOST",
		Long: "evacuate marks HOST draining in the fleet registry (with the operator's certificate), then has\n" +
			"HOST's vtpmd plan a destination for every VM running there (enrolled, attested, live, not\n" +
			"draining, with room), and move them: one batch per destination (one attestation, one transfer\n" +
			"key), at most --parallel hypervisor migrations at once, each batch committed as it finishes.\n" +
			"A refused destination is left out and its VMs re-planned. Ctrl-C stops it gracefully; running\n" +
			"the same command again continues where it stopped and never moves a VM twice. HOST stays\n" +
			"draining until 'vtpmctl host undrain HOST'.\n" +
			"Exit codes: 0 every VM left HOST; 1 it could not run; 2 some VMs have no trusted destination\n" +
			"with room (they run on HOST); 3 some migrations failed and were rolled back; 4 some VMs were\n" +
			"left open for recovery; 5 another evacuation of HOST runs; 130 stopped: run it again.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req.Host = args[0]
			req.Headroom = headroom << 20
			ctx := cmd.Context()
			reg, err := rf.open(ctx)
			if err != nil && !req.DryRun {
				fmt.Fprintf(e.stderr, "vtpmctl: cannot reach the fleet registry as the operator (%v); vtpmd marks %s draining itself, which only a registry without RBAC allows\n", err, req.Host)
			}
			if reg != nil {
				defer reg.Close()
			}
			term := false
			if f, ok := e.stdout.(*os.File); ok && !asJSON {
				term = evacuate.IsTerminal(f)
			}
			r := evacuate.NewRenderer(e.stdout, evacuate.RenderOptions{JSON: asJSON, Terminal: term})
			end, err := operator.Evacuate(ctx, reg, client(), req, func(line []byte) error {
				var ev evacuate.Event
				if err := json.Unmarshal(line, &ev); err != nil {
					return fmt.Errorf("bad event: %w", err)
				}
				r.Event(ev)
				return nil
			})
			if cerr := r.Close(); err == nil && cerr != nil {
				err = cerr
			}
			if err != nil {
				return registryExit(err)
			}
			if end.ExitCode != evacuate.ExitOK {
				err := end.Err()
				if err == nil {
					err = fmt.Errorf("evacuate %s: exit %d (see the report)", req.Host, end.ExitCode)
				}
				return &exitError{code: end.ExitCode, err: err}
			}
			return nil
		},
	}
	fl := c.Flags()
	fl.StringSliceVar(&req.To, "to", nil, "only these destinations (H1,H2,...)")
	fl.IntVar(&req.Parallel, "parallel", evacuate.DefaultParallel, "hypervisor migrations at once, across all destinations")
	fl.BoolVar(&req.DryRun, "dry-run", false, "print the plan (attesting the destinations) and every host left out with its reason; move and mark nothing")
	fl.BoolVar(&asJSON, "json", false, "write NDJSON events (plan, vm-phase, vm-done, host-refused, host-failed, report)")
	fl.Uint64Var(&headroom, "headroom", evacuate.DefaultHeadroom>>20, "MiB kept free on every destination")
	rf.add(c)
	return c
}
