package identity

import (
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"

	"github.com/vtpmm/vtpmm/vtpm"
)

// Sentinel errors of package identity. Match them with errors.Is. TPM
// transport problems (no slots, busy, lockout) unwrap to
// vtpm.ErrTPMUnavailable.
var (
	// ErrNotProvisioned means the AK, the MK or the SRK is not at its
	// persistent handle: run Provision (vtpmd init) first.
	ErrNotProvisioned = errors.New("host TPM identity not provisioned")
	// ErrHandleInUse means a persistent handle holds an object of another
	// shape than the one vtpmm expects there.
	ErrHandleInUse = errors.New("persistent handle holds a foreign object")
	// ErrNoEK means the TPM has no endorsement key at the expected handles.
	ErrNoEK = errors.New("no endorsement key")
	// ErrChallengeMismatch means an activation challenge names another EK
	// or AK than this TPM's.
	ErrChallengeMismatch = errors.New("activation challenge is for another EK or AK")
	// ErrActivation means the TPM refused to release the credential: the
	// challenge was not made for this EK and this AK's name.
	ErrActivation = errors.New("credential activation refused by the TPM")
	// ErrBadBlob means a wrapped-key blob is malformed.
	ErrBadBlob = errors.New("malformed wrapped key blob")
	// ErrUnwrap means the TPM refused to import a wrapped key: it was not
	// wrapped for this migration key, or it was tampered with.
	ErrUnwrap = errors.New("wrapped key does not import under this migration key")
	// ErrMKPolicy means the migration key's PCR policy is not satisfied
	// (the boot state differs from the one the MK was bound to).
	ErrMKPolicy = errors.New("migration key PCR policy not satisfied")
	// ErrPCRsChanged means the PCRs kept changing between the quote and
	// the PCR read.
	ErrPCRsChanged = errors.New("PCRs changed while quoting")
	// ErrNoAKCert means the configured AK certificate source holds no
	// certificate (missing NV index or file, or not a certificate).
	ErrNoAKCert = errors.New("no AK certificate")
	// ErrAKCertMismatch means the AK certificate certifies another key
	// than the AK.
	ErrAKCertMismatch = errors.New("AK certificate does not certify the AK")
	// ErrBadOptions means a caller passed invalid options.
	ErrBadOptions = errors.New("invalid options")
)

// tpmError maps a TPM response code to a domain error, keeping the TPM
// error in the chain. op names the operation.
func tpmError(op string, err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, tpm2.TPMRCObjectMemory), errors.Is(err, tpm2.TPMRCSessionMemory):
		return fmt.Errorf("%s: %w: TPM out of object/session slots (a handle leaked?): %w", op, vtpm.ErrTPMUnavailable, err)
	case errors.Is(err, tpm2.TPMRCRetry), errors.Is(err, tpm2.TPMRCYielded), errors.Is(err, tpm2.TPMRCTesting):
		return fmt.Errorf("%s: %w: TPM busy: %w", op, vtpm.ErrTPMUnavailable, err)
	case errors.Is(err, tpm2.TPMRCLockout):
		return fmt.Errorf("%s: %w: TPM is in dictionary-attack lockout: %w", op, vtpm.ErrTPMUnavailable, err)
	}
	return fmt.Errorf("%s: %w", op, err)
}

// isNoObject reports whether err says that a handle holds no object.
func isNoObject(err error) bool {
	return errors.Is(err, tpm2.TPMRCHandle) || errors.Is(err, tpm2.TPMRCValue)
}
