// Command build-guest builds the end-to-end test guest (Debian cloud kernel
// + busybox initramfs running 'vtpmm-guest serve') and prints its paths:
//
//	go run ./test/guest/cmd/build-guest [-dir DIR] [-v]
//	kernel=/root/.cache/vtpmm/guest/kernel/linux-image-...vmlinuz
//	initrd=/root/.cache/vtpmm/guest/initrd-vtpmm.gz
//
// Boot it with: qemu-system-x86_64 -machine q35 -accel tcg -m 256 -nographic
// -kernel $kernel -initrd $initrd -append "console=ttyS0 panic=-1" and a TPM
// (-tpmdev emulator + -device tpm-crb, see test/guest/guest_test.go).
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/test/guest"
)

func main() {
	dir := flag.String("dir", guest.DefaultDir(), "cache and output directory")
	kpkg := flag.String("kernel-package", "", "kernel package (default: what linux-image-cloud-amd64 depends on)")
	verbose := flag.Bool("v", false, "log progress to stderr")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	log := logrus.New()
	log.SetOutput(os.Stderr)
	if !*verbose {
		log.SetLevel(logrus.WarnLevel)
	}
	img, err := guest.Build(ctx, guest.Config{Dir: *dir, Log: log, KernelPackage: *kpkg})
	if err != nil {
		fmt.Fprintln(os.Stderr, "build-guest:", err)
		stop()
		os.Exit(1)
	}
	fmt.Printf("kernel=%s\ninitrd=%s\n", img.Kernel, img.Initrd)
}
