package vtpm

import (
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
)

// tpmError maps a TPM response code to a domain error, keeping the TPM
// error in the chain. op names the operation for the message.
func tpmError(op string, err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, tpm2.TPMRCObjectMemory), errors.Is(err, tpm2.TPMRCSessionMemory):
		return fmt.Errorf("%s: %w: TPM out of object/session slots (a handle leaked?): %w", op, ErrTPMUnavailable, err)
	case errors.Is(err, tpm2.TPMRCRetry), errors.Is(err, tpm2.TPMRCYielded), errors.Is(err, tpm2.TPMRCTesting):
		return fmt.Errorf("%s: %w: TPM busy: %w", op, ErrTPMUnavailable, err)
	case errors.Is(err, tpm2.TPMRCLockout):
		return fmt.Errorf("%s: %w: TPM is in dictionary-attack lockout: %w", op, ErrTPMUnavailable, err)
	}
	return fmt.Errorf("%s: %w", op, err)
}
