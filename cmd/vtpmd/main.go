// Command vtpmd is the vtpmm host agent. All logic lives in Run; main is
// the composition root: it alone links the cgo backends (libvirt).
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/hypervisor/libvirt"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	hyps := hypervisor.NewRegistry()
	libvirt.Register(hyps)
	err := Run(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr, Deps{Hypervisors: hyps})
	stop()
	if err != nil {
		os.Exit(1)
	}
}
