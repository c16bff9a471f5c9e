// Command vtpmm-demo runs the vtpmm demo (make demo), on real components:
//
//   - Part 1, bind: the real vtpmd and vtpmm-guest against an emulated host
//     TPM (swtpm with EK certificates from a private CA, "booted" from a
//     real TCG event log): the VM key is sealed to the host TPM and its boot
//     state.
//   - Part 2, live migration on libvirt: three hosts, each in its own
//     network, mount and UTS namespaces with a private libvirtd, an
//     emulated host TPM and the real vtpmd (package test/lab). A Linux guest
//     seals a secret in its vTPM on host-a; 'vtpmctl migrate' moves it to
//     host-b, where it still unseals; host-c, booted from a tampered log, is
//     refused. Then 'vtpmctl evacuate host-a' moves two more VMs off host-a
//     (host-c left out by attestation); host-b loses power and its TPM, is
//     retired, and the guest comes back on host-a from its escrow bundle
//     ('vtpmctl restore' with 2 of 3 custodians) and unseals the same secret.
//
// It lives under test/, not cmd/: it is not a product binary but a driver
// of the lab (test/lab: namespaces, emulated host TPMs, the shared
// fixtures), so that nothing under cmd/ imports test/. 'make demo' builds it
// as bin/vtpmm-demo.
//
// It prints each step with its timing; the last line starts with DEMO OK.
// Everything it starts is stopped and removed at the end, also after a
// failure or Ctrl-C. It needs root, libvirt, QEMU and swtpm ('make deps').
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	// The first SIGINT or SIGTERM cancels ctx: the demo stops and cleans
	// up. Later ones are ignored until the clean-up is done (stop).
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := Run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	interrupted := ctx.Err() != nil
	stop()
	if err != nil && interrupted {
		os.Exit(130)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "DEMO FAILED: %v\n", err)
		os.Exit(1)
	}
}

// Run is the demo; see 'vtpmm-demo -h' for args.
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	d, err := newDemo(args, stdout, stderr)
	if err != nil {
		return err
	}
	return d.run(ctx)
}
