package guestseal

import "errors"

// Sentinel errors of package guestseal. Match them with errors.Is.
var (
	// ErrPolicy means the PCR policy of the sealed secret is not satisfied:
	// PCRs changed since Seal. The concrete error is a *PolicyError.
	ErrPolicy = errors.New("PCR policy not satisfied")
	// ErrNotSealed means the TPM holds no sealed secret.
	ErrNotSealed = errors.New("no sealed secret in this TPM")
	// ErrBadInput means the secret or the PCR list cannot be sealed.
	ErrBadInput = errors.New("invalid seal input")
)
