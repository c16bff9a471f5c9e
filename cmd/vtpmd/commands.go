package main

import (
	"bufio"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/vtpmm/vtpmm/cmd/vtpmd/daemon"
	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/host"
)

func initCmd(e *env) *cobra.Command {
	var recovery bool
	c := &cobra.Command{
		Use:   "init",
		Short: "Provision this host: SRK, and a vault key sealed to the TPM and the current boot state",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := e.config()
			if err != nil {
				return err
			}
			res, err := host.Init(cmd.Context(), cfg.Config, e.opts(), host.InitOptions{RecoveryKey: recovery})
			if err != nil {
				return err
			}
			fmt.Fprintf(e.stdout, "host %s initialised: vault key %s sealed to %s (%d TPM commands)\n",
				res.HostID, res.KeyID, strings.Join(res.SealedTo, "; "), res.TPMStats.Total)
			fmt.Fprintf(e.stdout, "attestation key %s and migration key %s are persistent in the TPM\n", res.AKName[:16], res.MKName[:16])
			if res.RecoveryKey != nil {
				fmt.Fprintf(e.stdout, "RECOVERY KEY (shown once, store it offline; it opens the vault on this TPM only):\n  %s\n",
					res.RecoveryKey.Reveal())
				res.RecoveryKey.Destroy()
			}
			return nil
		},
	}
	c.Flags().BoolVar(&recovery, "recovery-key", false, "also create a recovery key and print it once")
	return c
}

func runCmd(e *env) *cobra.Command {
	return &cobra.Command{
		Use:   "run",
		Short: "Run the agent: unseal the vault once, serve the agent wire, the admin socket and metrics until SIGTERM",
		Long: "run unseals the vault, binds its listeners, starts the vTPM of every VM created with\n" +
			"'vtpmd vm create' (hosts without a hypervisor), reconciles any migration a crash left open,\n" +
			"prints a line starting with 'ready:' and serves:\n" +
			"  - the agent wire (gRPC over mTLS) on 'listen' when tls is configured,\n" +
			"  - the admin API for vtpmctl on 'admin_socket',\n" +
			"  - Prometheus metrics on 'metrics_listen' when set.\n" +
			"SIGTERM stops the services, the vTPMs, and closes the ledger, the audit log and the TPM.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx := cmd.Context()
			cfg, err := e.config()
			if err != nil {
				return err
			}
			d, err := daemon.Start(ctx, cfg, daemon.Deps{Host: e.opts(), Hypervisors: e.deps.Hypervisors})
			if err != nil {
				return err
			}
			return serve(ctx, e, d)
		},
	}
}

// serve runs a started daemon until ctx ends (SIGTERM) or a service fails,
// and then closes it. Without a hypervisor, vtpmd runs each VM's vTPM
// itself; with one, the hypervisor does (libvirt starts swtpm with the key).
func serve(ctx context.Context, e *env, d *daemon.Daemon) (err error) {
	defer func() {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
		defer cancel()
		err = errors.Join(err, d.Close(cctx))
	}()
	var vms []host.VMStatus
	if d.RunsVTPMs() {
		if vms, err = d.Host().StartAll(ctx); err != nil {
			return err
		}
	}
	select {
	case <-d.Ready():
	case err := <-d.Err():
		return err
	case <-ctx.Done():
		return nil
	}
	for _, vm := range vms {
		fmt.Fprintf(e.stdout, "vTPM %s (%s) generation %d running at %s\n", vm.Name, vm.UUID, vm.Generation, vm.SocketURI)
	}
	fmt.Fprintf(e.stdout, "ready: %d vTPM(s); admin socket %s\n", len(vms), d.AdminAddr())
	select {
	case err := <-d.Err():
		return err
	case <-ctx.Done():
		return nil
	}
}

func vaultCmd(e *env) *cobra.Command {
	c := &cobra.Command{Use: "vault", Short: "Inspect, reseal or recover the host vault"}
	c.AddCommand(&cobra.Command{
		Use:   "status",
		Short: "Unseal the vault and report what it is sealed to",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return e.withHost(cmd.Context(), func(cfg daemon.Config, h *host.Host) error {
				st := h.Meter().Stats()
				fmt.Fprintf(e.stdout, "vault key %s open on host %s; sealed to: %s\nunseal cost: %d TPM commands (%s)\n",
					h.VaultKeyID(), cfg.HostID, strings.Join(h.SealedTo(), "; "), st.Total, st)
				return nil
			})
		},
	})
	var predict []string
	reseal := &cobra.Command{
		Use:   "reseal",
		Short: "Seal the vault to the current boot state (and to predicted PCR values of a planned update)",
		Long: "Reseal replaces the vault's PCR slots with one for the current PCR values, plus one per\n" +
			"--predict file. A predict file is JSON: {\"7\": \"<hex sha256>\", ...} or the output of\n" +
			"'vtpmctl eventlog replay -o json' (its sha256 bank is used).",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := e.config()
			if err != nil {
				return err
			}
			var preds []vtpm.PCRValues
			for _, p := range predict {
				v, err := readPredicted(p)
				if err != nil {
					return err
				}
				preds = append(preds, v)
			}
			h, err := host.Open(cmd.Context(), cfg.Config, e.opts())
			if err != nil {
				return err
			}
			defer h.Close(cmd.Context())
			if err := h.Reseal(cmd.Context(), preds); err != nil {
				return err
			}
			fmt.Fprintf(e.stdout, "vault resealed to: %s\n", strings.Join(h.SealedTo(), "; "))
			return nil
		},
	}
	reseal.Flags().StringArrayVar(&predict, "predict", nil, "JSON file of predicted PCR values (repeatable)")
	c.AddCommand(reseal)
	c.AddCommand(&cobra.Command{
		Use:   "recover",
		Short: "Open the vault with the recovery key (read from stdin) and reseal it to the current boot state",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := e.config()
			if err != nil {
				return err
			}
			line, err := bufio.NewReader(e.stdin).ReadString('\n')
			if err != nil && line == "" {
				return fmt.Errorf("recover: read the recovery key from stdin: %w", err)
			}
			rk, err := vtpm.ParseRecoveryKey(line)
			if err != nil {
				return err
			}
			defer rk.Destroy()
			h, err := host.Recover(cmd.Context(), cfg.Config, e.opts(), rk)
			if err != nil {
				return err
			}
			defer h.Close(cmd.Context())
			fmt.Fprintf(e.stdout, "vault recovered and resealed to: %s\n", strings.Join(h.SealedTo(), "; "))
			return nil
		},
	})
	return c
}

// readPredicted reads {"7":"hex"} or {"sha256":{"7":"hex"}}.
func readPredicted(path string) (vtpm.PCRValues, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("--predict: %w", err)
	}
	var banks map[string]map[string]string
	var flat map[string]string
	m := flat
	if json.Unmarshal(b, &banks) == nil && banks["sha256"] != nil {
		m = banks["sha256"]
	} else if err := json.Unmarshal(b, &flat); err == nil {
		m = flat
	} else {
		return nil, fmt.Errorf("--predict %s: want {\"<pcr>\": \"<hex>\"} or {\"sha256\": {...}}: %v", path, err)
	}
	out := vtpm.PCRValues{}
	for k, v := range m {
		i, err := strconv.Atoi(k)
		d, herr := hex.DecodeString(v)
		if err != nil || herr != nil || len(d) != 32 || i < 0 || i > 23 {
			return nil, fmt.Errorf("--predict %s: PCR %q = %q is not a PCR index with a SHA-256 value", path, k, v)
		}
		out[i] = d
	}
	return out, nil
}

func vmCmd(e *env) *cobra.Command {
	c := &cobra.Command{Use: "vm", Short: "Create and list this host's VM vTPMs"}
	var uuid string
	create := &cobra.Command{
		Use:   "create NAME",
		Short: "Create a vTPM for a VM: a new VM key and an encrypted swtpm state with EK certificates",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return e.withHost(cmd.Context(), func(cfg daemon.Config, h *host.Host) error {
				vm, err := h.CreateVM(cmd.Context(), args[0], uuid)
				if err != nil {
					return err
				}
				fmt.Fprintf(e.stdout, "created vTPM for VM %s (%s)\n", vm.Name, vm.UUID)
				return nil
			})
		},
	}
	create.Flags().StringVar(&uuid, "uuid", "", "the VM's UUID (default: random)")
	var asJSON bool
	list := &cobra.Command{
		Use:   "list",
		Short: "List this host's VMs and their key generations",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return e.withHost(cmd.Context(), func(cfg daemon.Config, h *host.Host) error {
				vms, err := h.ListVMs(cmd.Context())
				if err != nil {
					return err
				}
				if asJSON {
					return json.NewEncoder(e.stdout).Encode(vms)
				}
				w := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(w, "NAME\tUUID\tGENERATION\tCREATED")
				for _, vm := range vms {
					fmt.Fprintf(w, "%s\t%s\t%d\t%s\n", vm.Name, vm.UUID, vm.Generation, vm.Created.Format("2006-01-02T15:04:05Z"))
				}
				return w.Flush()
			})
		},
	}
	list.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	c.AddCommand(create, list)
	return c
}
