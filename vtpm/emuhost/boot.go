package emuhost

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/google/go-attestation/attest"
	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmm/vtpmm/vtpm"
)

// evNoAction is EV_NO_ACTION: informational events that are never extended.
const evNoAction = 0x00000003

// Boot "boots" the host: it extends every event digest of a TCG event log
// (crypto-agile or legacy SHA-1 format, every bank the log has) into the
// PCRs, as firmware would. Boot it right after Start or Restart, on freshly
// reset PCRs. Boot opens its own connection: swtpm serves one data
// connection at a time, so close other connections first, or use BootTPM on
// an open one.
func (h *Host) Boot(ctx context.Context, eventLog []byte) error {
	tpm, err := vtpm.Open(ctx, h.URI())
	if err != nil {
		return fmt.Errorf("emuhost boot %s: %w", h.cfg.Name, err)
	}
	defer tpm.Close()
	return BootTPM(ctx, tpm, eventLog, h.cfg.PCRBanks)
}

// bankName names a PCR bank the way swtpm_setup --pcr-banks does.
func bankName(a attest.HashAlg) (string, bool) {
	switch a {
	case attest.HashSHA1:
		return "sha1", true
	case attest.HashSHA256:
		return "sha256", true
	case attest.HashSHA384:
		return "sha384", true
	case attest.HashSHA512:
		return "sha512", true
	}
	return "", false
}

// BootTPM extends the digests of eventLog into tpm's PCRs. banks names the
// PCR banks allocated in the TPM ("sha1", "sha256", ...); a log that needs a
// bank the TPM does not have is refused rather than silently ignored (the
// TPM drops digests for unallocated banks). It sends one PCR_Extend per
// event, carrying the digests of all banks.
func BootTPM(ctx context.Context, tpm transport.TPM, eventLog []byte, banks []string) error {
	el, err := attest.ParseEventLog(eventLog)
	if err != nil {
		return fmt.Errorf("boot: %w: %v", ErrEventLog, err)
	}
	type bank struct {
		alg    tpm2.TPMIAlgHash
		events []attest.Event
	}
	var bs []bank
	for _, a := range el.Algs {
		name, ok := bankName(a)
		if !ok {
			return fmt.Errorf("boot: %w: unsupported hash algorithm %v in the log", ErrEventLog, a)
		}
		if !slices.Contains(banks, name) {
			return fmt.Errorf("boot: %w: the log has a %s bank but the TPM allocates only %s", ErrEventLog, name, strings.Join(banks, ","))
		}
		bs = append(bs, bank{alg: tpm2.TPMIAlgHash(a), events: el.Events(a)})
	}
	if len(bs) == 0 {
		return fmt.Errorf("boot: %w: the log names no hash algorithm", ErrEventLog)
	}
	for i, ev := range bs[0].events {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("boot: %w", err)
		}
		if ev.Type == evNoAction {
			if ev.Index == 0 && len(ev.Data) == 17 && strings.HasPrefix(string(ev.Data), "StartupLocality") && ev.Data[16] != 0 {
				return fmt.Errorf("boot: %w: the log starts PCR0 at locality %d (H-CRTM/TXT), which cannot be emulated by PCR_Extend", ErrEventLog, ev.Data[16])
			}
			continue
		}
		if ev.Index < 0 || ev.Index > 23 || (ev.Index >= 17 && ev.Index <= 22) {
			return fmt.Errorf("boot: %w: event %d extends PCR %d, which is not extendable at locality 0", ErrEventLog, i, ev.Index)
		}
		var digests tpm2.TPMLDigestValues
		for _, b := range bs {
			d := b.events[i].Digest
			if len(d) == 0 {
				return fmt.Errorf("boot: %w: event %d (PCR %d) has no %v digest", ErrEventLog, i, ev.Index, b.alg)
			}
			digests.Digests = append(digests.Digests, tpm2.TPMTHA{HashAlg: b.alg, Digest: d})
		}
		_, err := tpm2.PCRExtend{
			PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(ev.Index), Auth: tpm2.PasswordAuth(nil)},
			Digests:   digests,
		}.Execute(tpm)
		if err != nil {
			return fmt.Errorf("boot: PCR_Extend(PCR %d, event %d): %w", ev.Index, i, err)
		}
	}
	return nil
}
