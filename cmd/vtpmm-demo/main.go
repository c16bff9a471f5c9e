// Command vtpmm-demo runs the vtpmm demo (make demo): real vtpmd and
// vtpmm-guest processes against emulated host TPMs (swtpm with EK
// certificates from a private CA, "booted" from a real TCG event log).
// It prints each step with its timing; the last line starts with DEMO OK.
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
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := Run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err != nil {
		fmt.Fprintf(os.Stderr, "DEMO FAILED: %v\n", err)
		os.Exit(1)
	}
}

// Run is the demo; args: [--bin DIR] [--work DIR] [--keep].
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	d, err := newDemo(args, stdout, stderr)
	if err != nil {
		return err
	}
	defer d.cleanup()
	return d.run(ctx)
}
