package vtpm

import (
	"context"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// DefaultSRKHandle is the TCG-recommended persistent handle of the storage root key.
const DefaultSRKHandle tpm2.TPMHandle = 0x81000001

// srkInfo is a persistent storage root key: its handle, name and public area.
type srkInfo struct {
	Handle tpm2.TPMHandle
	Name   tpm2.TPM2BName
	Public tpm2.TPMTPublic
}

// readSRK reads the persistent SRK at handle (one ReadPublic). A TPM without
// a key there yields ErrWrongTPM: it never held anything vtpmm sealed.
func readSRK(tpm transport.TPM, h tpm2.TPMHandle) (srkInfo, error) {
	rsp, err := tpm2.ReadPublic{ObjectHandle: h}.Execute(tpm)
	if err != nil {
		if errors.Is(err, tpm2.TPMRCHandle) || errors.Is(err, tpm2.TPMRCValue) {
			return srkInfo{}, fmt.Errorf("read SRK 0x%08x: %w: no storage root key at that handle", uint32(h), ErrWrongTPM)
		}
		return srkInfo{}, tpmError(fmt.Sprintf("read SRK 0x%08x", uint32(h)), err)
	}
	pub, err := rsp.OutPublic.Contents()
	if err != nil {
		return srkInfo{}, fmt.Errorf("read SRK: %w: %v", ErrTPMResponse, err)
	}
	return srkInfo{Handle: h, Name: rsp.Name, Public: *pub}, nil
}

// EnsureSRK makes sure an ECC P-256 SRK (TCG template) is persistent at h and
// returns its name. It runs CreatePrimary only when the handle is empty, so
// it belongs in provisioning (vtpmd init), never on a request path.
func EnsureSRK(ctx context.Context, tpm transport.TPM, h tpm2.TPMHandle) (tpm2.TPM2BName, error) {
	if err := ctx.Err(); err != nil {
		return tpm2.TPM2BName{}, err
	}
	if s, err := readSRK(tpm, h); err == nil {
		if !isStorageKey(s.Public) {
			return tpm2.TPM2BName{}, fmt.Errorf("ensure SRK 0x%08x: %w: the key there is not a restricted decryption key", uint32(h), ErrWrongTPM)
		}
		return s.Name, nil
	} else if !errors.Is(err, ErrWrongTPM) {
		return tpm2.TPM2BName{}, err
	}
	cp, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.TPMRHOwner,
		InPublic:      tpm2.New2B(tpm2.ECCSRKTemplate),
	}.Execute(tpm)
	if err != nil {
		return tpm2.TPM2BName{}, tpmError("create SRK", err)
	}
	defer flush(tpm, cp.ObjectHandle)
	_, err = tpm2.EvictControl{
		Auth:             tpm2.TPMRHOwner,
		ObjectHandle:     &tpm2.NamedHandle{Handle: cp.ObjectHandle, Name: cp.Name},
		PersistentHandle: h,
	}.Execute(tpm)
	if err != nil {
		return tpm2.TPM2BName{}, tpmError("persist SRK", err)
	}
	return cp.Name, nil
}

func isStorageKey(p tpm2.TPMTPublic) bool {
	a := p.ObjectAttributes
	return a.Restricted && a.Decrypt && !a.SignEncrypt && a.FixedTPM && a.FixedParent
}

// flush releases a transient object or session handle. Errors are ignored:
// it runs in defers after the real result is known.
func flush(tpm transport.TPM, h tpm2.TPMHandle) {
	_, _ = tpm2.FlushContext{FlushHandle: h}.Execute(tpm)
}
