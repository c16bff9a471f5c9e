//go:build cgo

// Package tpmsim opens go-tpm-tools' in-process TPM 2.0 simulator (the
// Microsoft reference TPM, compiled with cgo and libssl) under the URI
// scheme "simulator", for tests only:
//
//	tpm, err := vtpm.Open(ctx, "simulator://", tpmsim.Option())
//	tpm, err := vtpm.Open(ctx, "simulator://?seed=42", tpmsim.Option()) // fixed seed, insecure
//
// There is one simulator per process: a second Open blocks until the first
// is closed. Use swtpm (vtpm/emuhost) when a test needs two TPMs.
package tpmsim

import (
	"context"
	"fmt"
	"net/url"
	"strconv"

	"github.com/google/go-tpm-tools/simulator"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmm/vtpmm/vtpm"
)

// Option registers the "simulator" scheme with vtpm.Open.
func Option() vtpm.OpenOption { return vtpm.WithOpener("simulator", Open) }

// Open starts the simulator; the query parameter seed=N makes it
// deterministic (insecure: every key is derived from N).
func Open(ctx context.Context, u *url.URL) (transport.TPMCloser, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	var (
		sim *simulator.Simulator
		err error
	)
	if s := u.Query().Get("seed"); s != "" {
		seed, perr := strconv.ParseInt(s, 10, 64)
		if perr != nil {
			return nil, fmt.Errorf("simulator seed %q: %w", s, vtpm.ErrBadURI)
		}
		sim, err = simulator.GetWithFixedSeedInsecure(seed)
	} else {
		sim, err = simulator.Get()
	}
	if err != nil {
		return nil, err
	}
	return transport.FromReadWriteCloser(sim), nil
}
