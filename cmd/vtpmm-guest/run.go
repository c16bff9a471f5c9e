package main

import (
	"context"
	"crypto/rand"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/vtpmm/vtpmm/internal/guestseal"
	"github.com/vtpmm/vtpmm/vtpm"
)

// errUsage marks a command-line mistake.
var errUsage = errors.New("usage")

const usage = `usage: vtpmm-guest --tpm URI seal --secret-file FILE [--pcrs 16[,N...]]
       vtpmm-guest --tpm URI unseal
       vtpmm-guest --tpm URI serve [--pcr 16] [--interval 1s] [--count 0] [--wait 10s] [--marker S]
URI: device:///dev/tpmrm0, swtpm+unix:///path, swtpm+tcp://127.0.0.1:PORT`

// Run is the whole program; main only wires the process to it.
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("vtpmm-guest", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprintln(stderr, usage) }
	uri := fs.String("tpm", "device:///dev/tpmrm0", "TPM URI")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if fs.NArg() == 0 {
		fs.Usage()
		return fmt.Errorf("%w: missing command (seal, unseal or serve)", errUsage)
	}
	cmd, rest := fs.Arg(0), fs.Args()[1:]
	switch cmd {
	case "seal":
		sf := flag.NewFlagSet("seal", flag.ContinueOnError)
		sf.SetOutput(stderr)
		secretFile := sf.String("secret-file", "", "file holding the secret (- for stdin)")
		pcrList := sf.String("pcrs", "16", "comma-separated SHA-256 PCRs to seal to")
		if err := sf.Parse(rest); err != nil {
			return fmt.Errorf("%w: %v", errUsage, err)
		}
		if *secretFile == "" {
			return fmt.Errorf("%w: seal needs --secret-file", errUsage)
		}
		pcrs, err := parsePCRs(*pcrList)
		if err != nil {
			return err
		}
		var secret []byte
		if *secretFile == "-" {
			secret, err = io.ReadAll(io.LimitReader(os.Stdin, guestseal.MaxSecret+1))
		} else {
			secret, err = os.ReadFile(*secretFile)
		}
		if err != nil {
			return fmt.Errorf("seal: read secret: %w", err)
		}
		tpm, err := vtpm.Open(ctx, *uri)
		if err != nil {
			return err
		}
		defer tpm.Close()
		if err := guestseal.Seal(ctx, tpm, secret, pcrs); err != nil {
			return err
		}
		fmt.Fprintf(stderr, "sealed %d bytes to PCRs %v at %#x\n", len(secret), pcrs, uint32(guestseal.SealedHandle))
		return nil
	case "unseal":
		if len(rest) != 0 {
			return fmt.Errorf("%w: unseal takes no arguments", errUsage)
		}
		tpm, err := vtpm.Open(ctx, *uri)
		if err != nil {
			return err
		}
		defer tpm.Close()
		secret, err := guestseal.Unseal(ctx, tpm)
		if err != nil {
			return err
		}
		_, err = stdout.Write(secret)
		return err
	case "serve":
		sf := flag.NewFlagSet("serve", flag.ContinueOnError)
		sf.SetOutput(stderr)
		c := serveConfig{URI: *uri, Rand: rand.Reader}
		sf.IntVar(&c.PCR, "pcr", 16, "SHA-256 PCR to extend once per boot and seal to")
		sf.StringVar(&c.Marker, "marker", DefaultBootMarker, "boot marker extended into --pcr (as its SHA-256)")
		sf.DurationVar(&c.Interval, "interval", time.Second, "time between unseal ticks")
		sf.IntVar(&c.Count, "count", 0, "stop after this many ticks (0: run until killed)")
		sf.DurationVar(&c.Wait, "wait", 10*time.Second, "keep retrying to open the TPM this long")
		if err := sf.Parse(rest); err != nil {
			return fmt.Errorf("%w: %v", errUsage, err)
		}
		if sf.NArg() != 0 || c.PCR < 0 || c.PCR > 23 || c.Interval <= 0 || c.Count < 0 {
			return fmt.Errorf("%w: serve: bad arguments (PCR 0..23, interval > 0, count >= 0, no positional arguments)", errUsage)
		}
		return serve(ctx, c, stdout)
	}
	fs.Usage()
	return fmt.Errorf("%w: unknown command %q", errUsage, cmd)
}

func parsePCRs(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 0 || n > 23 {
			return nil, fmt.Errorf("%w: bad PCR %q in --pcrs", errUsage, f)
		}
		out = append(out, n)
	}
	return out, nil
}
