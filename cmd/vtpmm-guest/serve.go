package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmm/vtpmm/internal/guestseal"
	"github.com/vtpmm/vtpmm/vtpm"
)

// DefaultBootMarker is extended into the serve PCR once per boot. The test
// guest (test/guest) computes the expected PCR value from the same string.
const DefaultBootMarker = "vtpmm-guest-boot"

// serveConfig drives the guest's console loop.
type serveConfig struct {
	URI      string
	PCR      int
	Marker   string
	Interval time.Duration
	Count    int           // unseal ticks; 0 = until ctx ends
	Wait     time.Duration // how long to retry opening the TPM
	Rand     io.Reader
}

// serve is the test guest's main loop, one line per event on out:
//
//	VTPMM-BOOT pcr16=<hex> extended|kept
//	VTPMM-SEALED <secret>            first boot: nothing was sealed
//	VTPMM-FOUND <secret>             a secret sealed earlier unseals
//	VTPMM-UNSEAL <n> <secret> pcr16=<hex>
//	VTPMM-UNSEAL <n> ERROR pcr16=<hex> <error>
//
// The PCR is extended with sha256(marker) only while it is all zeros, so a
// restarted serve in the same boot (or a live migration) keeps the value, and
// a reboot recreates it: the secret sealed to it keeps unsealing. A vTPM
// whose state was lost shows up as ERROR lines (PCR reset, or not sealed).
func serve(ctx context.Context, c serveConfig, out io.Writer) error {
	pcrName := fmt.Sprintf("pcr%d", c.PCR)
	tpm, err := openWait(ctx, c.URI, c.Wait)
	if err != nil {
		return err
	}
	val, state, err := bootExtend(tpm, c.PCR, c.Marker)
	if err != nil {
		_ = tpm.Close()
		return err
	}
	fmt.Fprintf(out, "VTPMM-BOOT %s=%x %s\n", pcrName, val, state)
	secret, err := guestseal.Unseal(ctx, tpm)
	switch {
	case err == nil:
		fmt.Fprintf(out, "VTPMM-FOUND %s\n", secret)
	case errors.Is(err, guestseal.ErrNotSealed):
		s, serr := newSecret(c.Rand)
		if serr == nil {
			serr = guestseal.Seal(ctx, tpm, []byte(s), []int{c.PCR})
		}
		if serr != nil {
			_ = tpm.Close()
			return serr
		}
		fmt.Fprintf(out, "VTPMM-SEALED %s\n", s)
	default:
		fmt.Fprintf(out, "VTPMM-ERROR %s\n", oneLine(err))
	}
	if err := tpm.Close(); err != nil {
		return err
	}
	t := time.NewTicker(c.Interval)
	defer t.Stop()
	for n := 1; c.Count == 0 || n <= c.Count; n++ {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		secret, val, err := tick(ctx, c.URI, c.PCR)
		pcr := hex.EncodeToString(val)
		if pcr == "" {
			pcr = "?"
		}
		if err != nil {
			fmt.Fprintf(out, "VTPMM-UNSEAL %d ERROR %s=%s %s\n", n, pcrName, pcr, oneLine(err))
		} else {
			fmt.Fprintf(out, "VTPMM-UNSEAL %d %s %s=%s\n", n, secret, pcrName, pcr)
		}
	}
	return nil
}

// tick opens the TPM, unseals and reads the PCR, and closes it again, like
// a separate 'vtpmm-guest unseal' would.
func tick(ctx context.Context, uri string, pcr int) (secret string, val []byte, err error) {
	tpm, err := vtpm.Open(ctx, uri)
	if err != nil {
		return "", nil, err
	}
	defer tpm.Close()
	val, perr := readPCR(tpm, pcr)
	s, err := guestseal.Unseal(ctx, tpm)
	if err == nil {
		err = perr
	}
	return string(s), val, err
}

func openWait(ctx context.Context, uri string, wait time.Duration) (transport.TPMCloser, error) {
	deadline := time.Now().Add(wait)
	for {
		tpm, err := vtpm.Open(ctx, uri)
		if err == nil || time.Now().After(deadline) || ctx.Err() != nil {
			return tpm, err
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// bootExtend extends pcr with sha256(marker) if it is all zeros, and returns
// its value afterwards.
func bootExtend(tpm transport.TPM, pcr int, marker string) ([]byte, string, error) {
	val, err := readPCR(tpm, pcr)
	if err != nil {
		return nil, "", err
	}
	if !bytes.Equal(val, make([]byte, len(val))) {
		return val, "kept", nil
	}
	d := sha256.Sum256([]byte(marker))
	if _, err := (tpm2.PCRExtend{
		PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(pcr), Auth: tpm2.PasswordAuth(nil)},
		Digests:   tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: d[:]}}},
	}).Execute(tpm); err != nil {
		return nil, "", fmt.Errorf("PCR_Extend(%d): %w", pcr, err)
	}
	val, err = readPCR(tpm, pcr)
	return val, "extended", err
}

func readPCR(tpm transport.TPM, pcr int) ([]byte, error) {
	r, err := tpm2.PCRRead{PCRSelectionIn: tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{
		{Hash: tpm2.TPMAlgSHA256, PCRSelect: tpm2.PCClientCompatible.PCRs(uint(pcr))},
	}}}.Execute(tpm)
	if err != nil {
		return nil, fmt.Errorf("PCR_Read(%d): %w", pcr, err)
	}
	if len(r.PCRValues.Digests) != 1 {
		return nil, fmt.Errorf("PCR_Read(%d): no SHA-256 bank", pcr)
	}
	return r.PCRValues.Digests[0].Buffer, nil
}

// newSecret returns 16 random bytes in hex: printable, one word.
func newSecret(r io.Reader) (string, error) {
	b := make([]byte, 16)
	if _, err := io.ReadFull(r, b); err != nil {
		return "", fmt.Errorf("random secret: %w", err)
	}
	return hex.EncodeToString(b), nil
}

func oneLine(err error) string {
	return strings.Join(strings.Fields(err.Error()), " ")
}
