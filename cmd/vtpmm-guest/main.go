// Command vtpmm-guest seals and unseals a tenant secret inside the guest's
// (v)TPM under a PCR policy. It is built static (CGO_ENABLED=0) to run in a
// busybox initramfs:
//
//	vtpmm-guest --tpm device:///dev/tpmrm0 seal --secret-file F [--pcrs 16]
//	vtpmm-guest --tpm device:///dev/tpmrm0 unseal   # secret on stdout
//	vtpmm-guest --tpm device:///dev/tpmrm0 serve    # test guest console loop
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := Run(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "vtpmm-guest:", err)
		stop()
		os.Exit(1)
	}
}
