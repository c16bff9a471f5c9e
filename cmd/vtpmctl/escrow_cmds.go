package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"filippo.io/age/plugin"
	"github.com/spf13/cobra"

	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/internal/errclass"
	"github.com/vtpmm/vtpmm/migrate/escrow"
	"github.com/vtpmm/vtpmm/migrate/recovery"
	"github.com/vtpmm/vtpmm/migrate/registry"
)

// escrowCommands are 'vtpmctl backup' and 'vtpmctl restore'
// (docs/recovery.md).
func escrowCommands(e *env, socket *string, rf *registryFlags) []*cobra.Command {
	client := func() *adminapi.Client { return adminapi.NewClient(*socket) }
	var out string
	var all, asJSON bool
	backup := &cobra.Command{
		Use:   "backup VM... -o DIR | --all",
		Short: "Write an escrow bundle per VM: its vTPM state and its key sealed for the custodians (k of n)",
		Long: "backup asks the local vtpmd to seal one bundle per VM (its vTPM state as it is at rest,\n" +
			"already encrypted under the VM key; the VM key sealed for escrow.custodians with\n" +
			"escrow.threshold; the VM, its generation and the time; authenticated as a whole) into\n" +
			"DIR/<vm-uuid>/<generation>-<time>.vtpmbundle (default backup.dir), and prune old bundles\n" +
			"(backup.keep). The VM keys are opened under the vault key in memory: 0 host TPM commands.\n" +
			"Exit 1 when a VM has no bundle.",
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) == 0 && !all {
				return fmt.Errorf("backup: name VMs or pass --all")
			}
			rep, err := client().Backup(cmd.Context(), adminapi.BackupRequest{VMs: args, All: all, Dir: out})
			if err != nil {
				return &exitError{code: errclass.ExitCode(err), err: err}
			}
			if asJSON {
				_ = json.NewEncoder(e.stdout).Encode(rep)
			} else {
				for _, it := range rep.Items {
					if it.Error != "" {
						fmt.Fprintf(e.stdout, "FAILED  %-20s %s: %s\n", it.Name, it.UUID, it.Error)
						continue
					}
					fmt.Fprintf(e.stdout, "ok      %-20s gen %-4d %7d B  %s\n", it.Name, it.Generation, it.Bytes, it.Path)
					for _, r := range it.Removed {
						fmt.Fprintf(e.stdout, "        removed %s\n", r)
					}
				}
				fmt.Fprintf(e.stdout, "%d bundles in %s on %s, %d host TPM commands, %s\n", len(rep.Items)-rep.Failed(), rep.Dir, rep.Host, rep.TPMCommands, rep.Took.Round(time.Millisecond))
			}
			if n := rep.Failed(); n > 0 {
				return &exitError{code: 1, err: fmt.Errorf("backup: %d of %d VMs have no bundle", n, len(rep.Items))}
			}
			return nil
		},
	}
	backup.Flags().StringVarP(&out, "output", "o", "", "directory of the bundles (default: vtpmd's backup.dir)")
	backup.Flags().BoolVar(&all, "all", false, "every VM this host owns")
	backup.Flags().BoolVar(&asJSON, "json", false, "print the report as JSON")
	backup.PersistentFlags().StringVar(socket, "socket", adminapi.DefaultSocket, "vtpmd admin socket")

	var to, vm string
	var idFiles []string
	var force, allowOlder, damaged bool
	restore := &cobra.Command{
		Use:   "restore BUNDLE --to HOST --identity FILE...",
		Short: "Restore a VM's vTPM from its escrow bundle onto an attested host, with k custodians' identities",
		Long: "restore opens BUNDLE with the custodians' age identities (k of them; files, or age plugin\n" +
			"identities such as hardware tokens), reads the VM's owner and generation in the fleet\n" +
			"registry, has the local vtpmd attest HOST with its policy (as a migration source does),\n" +
			"wraps the VM key for HOST's certified migration key and sends it with the vTPM state through\n" +
			"the local vtpmd (which cannot open it). The registry then names HOST the owner at a\n" +
			"generation above every one it has seen: every older copy refuses to start.\n" +
			"Refused (exit 2): fewer than k shares, a tampered bundle, another VM's bundle (--vm), a\n" +
			"bundle older than the registry's generation (unless --allow-older), a live owner (drain,\n" +
			"fence or retire it first; a draining or unreachable one needs --force), an untrusted or\n" +
			"unenrolled HOST, a HOST that holds or runs the VM. Exit 4 if the registry committed but HOST\n" +
			"has not confirmed (it finishes on its own), 6 when the registry has no quorum.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if to == "" || len(idFiles) == 0 {
				return fmt.Errorf("restore: --to HOST and at least one --identity FILE are required")
			}
			bundle, err := os.ReadFile(args[0])
			if err != nil {
				return err
			}
			h, err := escrow.Inspect(bundle)
			if err != nil {
				return &exitError{code: exitRefused, err: err}
			}
			fmt.Fprintf(e.stdout, "bundle %s: VM %s (%s) generation %d, sealed %s on %s; %d of %d custodians needed\n",
				h.ID, h.VM.Name, h.VM.UUID, h.Generation, h.Created.Format(time.RFC3339), h.SourceHost, h.Threshold, h.N)
			ui := &plugin.ClientUI{}
			if t := plugin.NewTerminalUI(func(format string, v ...any) { fmt.Fprintf(e.stderr, format+"\n", v...) },
				func(format string, v ...any) { fmt.Fprintf(e.stderr, format+"\n", v...) }); t != nil {
				ui = t
			}
			var ids []*escrow.Identity
			for _, f := range idFiles {
				rd, err := os.Open(f)
				if err != nil {
					return err
				}
				more, err := escrow.ParseIdentities(f, rd, ui)
				rd.Close()
				if err != nil {
					return &exitError{code: 1, err: err}
				}
				ids = append(ids, more...)
			}
			r := &recovery.Restorer{Admin: client(), Log: e.log}
			info, err := client().Registry(cmd.Context())
			if err != nil {
				return &exitError{code: errclass.ExitCode(err), err: err}
			}
			if info.Mode != string(registry.ModeNone) {
				reg, err := rf.open(cmd.Context())
				if err != nil {
					return registryExit(err)
				}
				defer reg.Close()
				r.Registry = reg
			}
			rep, err := r.Restore(cmd.Context(), recovery.Request{Bundle: bundle, Identities: ids, VM: vm, Dest: to,
				Force: force, AllowOlder: allowOlder, AcceptDamagedShares: damaged})
			if err != nil {
				return restoreExit(err)
			}
			if rep.Closed != "" {
				fmt.Fprintf(e.stdout, "closed transaction %s, which an interrupted restore of the VM had left open\n", rep.Closed)
			}
			prev := ""
			if rep.PreviousOwner != "" {
				prev = " (was " + rep.PreviousOwner + ")"
			}
			fmt.Fprintf(e.stdout, "restored VM %s (%s) onto %s%s at generation %d from bundle generation %d, opened by %s; relayed by %s, tx %s, %s\n",
				rep.VM.Name, rep.VM.UUID, rep.Dest, prev, rep.Generation, rep.FromGeneration, strings.Join(rep.Custodians, ", "), rep.Relay, rep.TxID, rep.Took.Round(time.Millisecond))
			if len(rep.Damaged) > 0 {
				fmt.Fprintf(e.stdout, "damaged shares (accepted): %s\n", strings.Join(rep.Damaged, ", "))
			}
			fmt.Fprintf(e.stdout, "every older copy of the VM is fenced; start it on %s\n", rep.Dest)
			return nil
		},
	}
	f := restore.Flags()
	f.StringVar(&to, "to", "", "the host to restore onto (attested with the local vtpmd's policy)")
	f.StringArrayVar(&idFiles, "identity", nil, "a custodian's age identity file (repeatable; age-keygen or age plugin identities)")
	f.StringVar(&vm, "vm", "", "the VM (UUID) the bundle must be of")
	f.BoolVar(&force, "force", false, "restore although the owner is draining or unreachable (not fenced)")
	f.BoolVar(&allowOlder, "allow-older", false, "restore a bundle older than the registry's generation (the vTPM rolls back)")
	f.BoolVar(&damaged, "accept-damaged-shares", false, "restore when some custodian's share is damaged but k intact ones rebuild the key")
	restore.PersistentFlags().StringVar(socket, "socket", adminapi.DefaultSocket, "vtpmd admin socket")
	rf.add(restore)
	return []*cobra.Command{backup, restore}
}

// restoreExit gives a restore's error its exit code: 2 for every refusal
// (the bundle's, the plan's, attestation's, the destination's rules), else
// its class's.
func restoreExit(err error) error {
	for _, s := range []error{escrow.ErrNotEnoughShares, escrow.ErrTampered, escrow.ErrWrongVM, escrow.ErrMalformed,
		escrow.ErrUnsupportedVersion, escrow.ErrStaleBundle, escrow.ErrOwnerActive, recovery.ErrNoRegistryRecord, recovery.ErrKeyProof, recovery.ErrDestNotActive, registry.ErrNotEnrolled} {
		if errors.Is(err, s) {
			return &exitError{code: exitRefused, err: err}
		}
	}
	return registryExit(err)
}

// retireCommand is 'vtpmctl host retire HOST'.
func retireCommand(e *env, rf *registryFlags) *cobra.Command {
	var force bool
	c := &cobra.Command{
		Use:   "retire HOST",
		Short: "Fence a dead host in the registry for good, and list the VMs to restore from their bundles",
		Long: "retire fences HOST (as 'host fence' does): it never becomes the owner of a VM again and its\n" +
			"VMs may be restored elsewhere without --force; the restored copies get a generation above\n" +
			"every one HOST held, so HOST, if it ever returns, starts none of them. A live HOST is refused\n" +
			"unless --force (exit 2). It lists the VMs the registry shows on HOST, with the command to\n" +
			"restore each from its newest bundle.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return rf.with(cmd.Context(), func(reg *registry.Client) error {
				rep, err := recovery.Retire(cmd.Context(), reg, args[0], force)
				if errors.Is(err, registry.ErrHostLive) || errors.Is(err, registry.ErrNotEnrolled) {
					return &exitError{code: exitRefused, err: err}
				}
				if err != nil {
					return registryExit(err)
				}
				state := "fenced for good"
				if rep.Already {
					state = "was already fenced"
				}
				fmt.Fprintf(e.stdout, "%s %s; %d VMs to restore from their newest bundles:\n", rep.Host, state, len(rep.VMs))
				for _, vm := range rep.VMs {
					fmt.Fprintf(e.stdout, "  %s generation %d: vtpmctl restore BACKUP_DIR/%s/<newest>.vtpmbundle --to HOST --identity ...\n", vm.ID, vm.Generation, vm.ID)
				}
				return nil
			})
		},
	}
	c.Flags().BoolVar(&force, "force", false, "fence HOST although it is live (an untrusted host)")
	return c
}
