package main

import (
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/spf13/cobra"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/internal/atomicfile"
)

// Hook mode: vtpmctl is libvirt's qemu hook. libvirt runs
// /etc/libvirt/hooks/qemu.d/* as "NAME OPERATION SUB-OPERATION EXTRA" with
// the domain XML on stdin; a non-zero exit of "migrate begin" cancels an
// incoming migration and libvirt puts the hook's stderr into the error
// that virsh prints.

// hookFileName is the hook's file name under HOOKS_DIR/qemu.d.
const hookFileName = "vtpmm"

// maxDomainXML bounds the domain XML read from libvirt.
const maxDomainXML = 4 << 20

// hookDomain is the part of a domain's XML the hook reads.
type hookDomain struct {
	Name string `xml:"name"`
	UUID string `xml:"uuid"`
	TPMs []struct {
		Backend struct {
			Type       string `xml:"type,attr"`
			Encryption *struct {
				Secret string `xml:"secret,attr"`
			} `xml:"encryption"`
		} `xml:"backend"`
	} `xml:"devices>tpm"`
}

// parseHookDomain returns the domain if its vTPM is vtpmm's: an emulator
// vTPM encrypted with the secret vtpmm derives from the VM's UUID.
func parseHookDomain(r io.Reader) (hookDomain, error) {
	var d hookDomain
	b, err := io.ReadAll(io.LimitReader(r, maxDomainXML+1))
	if err != nil {
		return d, fmt.Errorf("read domain XML: %w", err)
	}
	if len(b) > maxDomainXML {
		return d, fmt.Errorf("domain XML is larger than %d bytes", maxDomainXML)
	}
	if err := xml.Unmarshal(b, &d); err != nil {
		return d, fmt.Errorf("parse domain XML: %w", err)
	}
	d.UUID = strings.ToLower(d.UUID)
	for _, t := range d.TPMs {
		if enc := t.Backend.Encryption; t.Backend.Type == "emulator" && enc != nil && d.UUID != "" &&
			strings.EqualFold(enc.Secret, hypervisor.SecretUUID(d.UUID)) {
			return d, nil
		}
	}
	return d, errNotOurs
}

func hookCommands(e *env) *cobra.Command {
	var socket string
	c := &cobra.Command{
		Use:   "hook",
		Short: "Hook mode: vtpmm as libvirt's qemu hook, so a plain 'virsh migrate' moves the vTPM key",
	}
	c.PersistentFlags().StringVar(&socket, "socket", adminapi.DefaultSocket, "vtpmd admin socket")

	var dir, exe string
	install := &cobra.Command{
		Use:   "install",
		Short: "Install the qemu hook (HOOKS_DIR/qemu.d/" + hookFileName + "); restart libvirtd afterwards",
		Long: "install writes HOOKS_DIR/qemu.d/" + hookFileName + ", a script that runs 'vtpmctl hook qemu'. With it, libvirt asks\n" +
			"the local vtpmd, when an incoming migration of a vTPM VM begins, to pull the VM's key from its\n" +
			"owner; an untrusted destination fails the migration at once, with the reason in virsh's error.\n" +
			"libvirtd (or virtqemud) reads the hooks directory when it starts: restart it after installing.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if exe == "" {
				p, err := os.Executable()
				if err != nil {
					return err
				}
				exe = p
			}
			p, err := installHook(dir, exe, socket)
			if err != nil {
				return err
			}
			fmt.Fprintf(e.stdout, "installed %s (runs %s hook qemu --socket %s)\n", p, exe, socket)
			fmt.Fprintln(e.stdout, "restart libvirtd so that it runs the hook: systemctl restart libvirtd (or virtqemud)")
			return nil
		},
	}
	install.Flags().StringVar(&dir, "hooks-dir", "/etc/libvirt/hooks", "libvirt's hooks directory")
	install.Flags().StringVar(&exe, "vtpmctl", "", "path of vtpmctl the hook runs (default: this program)")

	uninstall := &cobra.Command{
		Use:   "uninstall",
		Short: "Remove the qemu hook",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			p := filepath.Join(dir, "qemu.d", hookFileName)
			if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
				return err
			}
			fmt.Fprintf(e.stdout, "removed %s; restart libvirtd\n", p)
			return nil
		},
	}
	uninstall.Flags().StringVar(&dir, "hooks-dir", "/etc/libvirt/hooks", "libvirt's hooks directory")

	qemu := &cobra.Command{
		Use:   "qemu DOMAIN OPERATION SUB-OPERATION [EXTRA]",
		Short: "Run as libvirt's qemu hook (domain XML on stdin)",
		Args:  cobra.RangeArgs(3, 4),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runQemuHook(cmd.Context(), adminapi.NewClient(socket), args[1], args[2], cmd.InOrStdin(), e.stderr)
		},
	}
	c.AddCommand(install, uninstall, qemu)
	return c
}

// hookScript is the script libvirt runs. libvirt runs every hook for
// every qemu domain event (six per live migration); the script starts
// vtpmctl only for the events vtpmm acts on (hookEvents) and lets every
// other one through at once, in the shell, which saves a process start
// (50-100 ms under load) on each of the others.
func hookScript(exe, socket string) string {
	events := slices.Sorted(maps.Keys(hookEvents))
	return "#!/bin/sh\n" +
		"# vtpmm hook mode, installed by 'vtpmctl hook install': libvirt runs this for every qemu\n" +
		"# domain event; it acts on vTPM VMs only (incoming migrations, starts and releases).\n" +
		"case \"$2 $3\" in\n" +
		"  " + strings.Join(quoteAll(events), "|") + ") ;;\n" +
		"  *) exit 0 ;;\n" +
		"esac\n" +
		"exec " + shellQuote(exe) + " hook qemu --socket " + shellQuote(socket) + " \"$@\"\n"
}

func quoteAll(ss []string) []string {
	out := make([]string, len(ss))
	for i, s := range ss {
		out[i] = shellQuote(s)
	}
	return out
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// installHook writes the hook atomically (mode 0755) and returns its path.
func installHook(dir, exe, socket string) (string, error) {
	if !filepath.IsAbs(exe) || !filepath.IsAbs(socket) {
		return "", fmt.Errorf("hook install: --vtpmctl %q and --socket %q must be absolute paths", exe, socket)
	}
	d := filepath.Join(dir, "qemu.d")
	if err := os.MkdirAll(d, 0o755); err != nil {
		return "", fmt.Errorf("hook install: %w", err)
	}
	p := filepath.Join(d, hookFileName)
	if err := atomicfile.WriteFile(p, []byte(hookScript(exe, socket)), 0o755); err != nil {
		return "", fmt.Errorf("hook install: %w", err)
	}
	return p, nil
}

// runQemuHook handles one hook call. Only vtpmm's vTPM VMs are acted on:
//   - "migrate begin" (destination): pull the key now; an error exits
//     non-zero, which cancels the incoming migration, and its message
//     reaches virsh's error;
//   - "prepare begin" (before the vTPM starts): vtpmd defines the secret
//     from its vault if this host owns the key; a VM whose key is not here
//     fails to start, with the reason. If vtpmd is not running (no socket,
//     or nobody listening: adminapi.ErrUnreachable), the start goes on with
//     the secret libvirt has (vtpmd down does not block starts). A vtpmd
//     that runs but does not answer within adminapi.HookTimeout
//     (adminapi.ErrNoAnswer) fails the start closed (rule vtpmd-answers):
//     it may be deciding that this host must not start the VM;
//   - "release end": tell vtpmd the VM let go of this host, so it settles
//     the VM's transaction (asynchronously: libvirt holds the domain's lock
//     until the hook returns). Never fails.
func runQemuHook(ctx context.Context, c *adminapi.Client, op, subop string, stdin io.Reader, stderr io.Writer) error {
	ev, ok := hookEvents[op+" "+subop]
	if !ok {
		return nil
	}
	d, err := parseHookDomain(stdin)
	if errors.Is(err, errNotOurs) || (err != nil && !ev.mustAnswer) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("vtpmm hook: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, adminapi.HookTimeout)
	defer cancel()
	err = ev.call(ctx, c, adminapi.HookRequest{UUID: d.UUID, Name: d.Name}, d, stderr)
	switch {
	case err == nil:
		return nil
	case !ev.mustAnswer || (ev.startsWithoutVtpmd && errors.Is(err, adminapi.ErrUnreachable)):
		fmt.Fprintf(stderr, "vtpmm hook: %s of VM %s goes on: %v\n", op, d.Name, err)
		return nil
	case errors.Is(err, adminapi.ErrNoAnswer):
		return &exitError{code: 2, err: fmt.Errorf("vtpmm refused %s VM %s (%s): %w; a vtpmd that runs but does not answer "+
			"may be refusing this host the VM, so the hook fails closed (rule vtpmd-answers)", ev.refusal, d.Name, d.UUID, err)}
	}
	return fmt.Errorf("vtpmm refused %s VM %s (%s): %w", ev.refusal, d.Name, d.UUID, err)
}

// hookEvent is how the hook handles one libvirt event.
type hookEvent struct {
	// call asks vtpmd.
	call func(ctx context.Context, c *adminapi.Client, req adminapi.HookRequest, d hookDomain, stderr io.Writer) error
	// mustAnswer: a failure fails libvirt's operation (exit 1). Otherwise
	// the hook never fails (vtpmd's recovery catches up).
	mustAnswer bool
	// startsWithoutVtpmd: vtpmd being down does not fail the operation
	// (libvirt goes on with the secret it has, and fails without one).
	startsWithoutVtpmd bool
	refusal            string // "the incoming migration of", "to start"
}

var hookEvents = map[string]hookEvent{
	"migrate begin": {call: hookPull, mustAnswer: true, refusal: "the incoming migration of"},
	"prepare begin": {call: hookPrepare, mustAnswer: true, startsWithoutVtpmd: true, refusal: "to start"},
	"release end":   {call: hookReleased},
}

func hookPull(ctx context.Context, c *adminapi.Client, req adminapi.HookRequest, d hookDomain, stderr io.Writer) error {
	pr, err := c.HookPull(ctx, req)
	if err == nil {
		fmt.Fprintf(stderr, "vtpmm: vTPM key of VM %s pulled from %s (tx %s, %s)\n", d.Name, pr.Owner, pr.TxID, pr.Took)
	}
	return err
}

func hookPrepare(ctx context.Context, c *adminapi.Client, req adminapi.HookRequest, _ hookDomain, _ io.Writer) error {
	_, err := c.HookPrepare(ctx, req)
	return err
}

func hookReleased(ctx context.Context, c *adminapi.Client, req adminapi.HookRequest, _ hookDomain, _ io.Writer) error {
	return c.HookReleased(ctx, req)
}
