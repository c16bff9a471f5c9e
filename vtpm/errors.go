package vtpm

import (
	"errors"

	"github.com/vtpmm/vtpmm/internal/errclass"
)

// Sentinel errors of package vtpm. Match them with errors.Is. The key
// store's (ErrKeyNotFound, ErrKeyExists, ErrWrongKey, ErrStaleGeneration)
// have classes in internal/errclass: they cross the agent wire.
var (
	// ErrBadURI means a TPM URI could not be parsed or names an unknown scheme.
	ErrBadURI = errors.New("unsupported TPM URI")
	// ErrTPMUnavailable means the TPM could not be reached.
	ErrTPMUnavailable = errors.New("TPM unavailable")
	// ErrTPMResponse means the TPM answered with a malformed response.
	ErrTPMResponse = errors.New("malformed TPM response")

	// ErrVaultNotInitialized means the data directory holds no vault yet.
	ErrVaultNotInitialized = errors.New("vault not initialized")
	// ErrVaultExists means init was asked to overwrite an existing vault.
	ErrVaultExists = errors.New("vault already initialized")
	// ErrVaultLocked means the vault key is not in memory (Open was not called or the vault was closed).
	ErrVaultLocked = errors.New("vault is locked")
	// ErrPCRMismatch means the PCRs no longer match the policy the vault was sealed to.
	// The concrete error is a *PCRMismatchError that lists the changed PCRs.
	ErrPCRMismatch = errors.New("PCR policy mismatch")
	// ErrWrongTPM means the vault was sealed by a different TPM (its storage root key differs).
	ErrWrongTPM = errors.New("vault was sealed by a different TPM")
	// ErrRecoveryKey means the recovery key given does not open this vault.
	ErrRecoveryKey = errors.New("recovery key rejected")
	// ErrCorrupt means a stored blob failed to decode or authenticate.
	ErrCorrupt = errors.New("stored data is corrupt or was tampered with")
	// ErrUnsupportedVersion means a stored blob carries a format version this build does not know.
	ErrUnsupportedVersion = errors.New("unsupported format version")

	// ErrKeyNotFound means no key is stored for the VM.
	ErrKeyNotFound = errclass.New(errclass.KeyNotFound, "no key stored for VM")
	// ErrKeyExists means a key is already stored for the VM.
	ErrKeyExists = errclass.New(errclass.KeyExists, "key already stored for VM")
	// ErrWrongKey means an envelope does not open under the key presented
	// (another host's vault, another VM, or another generation).
	ErrWrongKey = errclass.New(errclass.WrongKey, "envelope does not open under this key")
	// ErrStaleGeneration means a key at or below an already-seen generation was presented.
	ErrStaleGeneration = errclass.New(errclass.StaleGeneration, "stale generation")
	// ErrBadVMID means a VM identifier is not a canonical UUID.
	ErrBadVMID = errors.New("VM id is not a canonical UUID")

	// ErrSecretMarshal is returned by every attempt to marshal a plaintext key.
	ErrSecretMarshal = errors.New("refusing to marshal secret key material")
)

// Sentinel errors of the rollback anchor (anchor.go). Match them with errors.Is.
var (
	// ErrRollback means the data directory is older than the host TPM's
	// anchor counter: it was restored from a backup or copied back. The
	// concrete error is a *RollbackError.
	ErrRollback = errors.New("data directory rolled back")
	// ErrAnchorMismatch means the key store does not hold what the anchor
	// recorded (a subset of envelopes restored, or one deleted). The
	// concrete error is an *AnchorMismatchError naming each VM.
	ErrAnchorMismatch = errors.New("key store does not match the rollback anchor")
	// ErrAnchorAhead means the anchor file records a higher counter than the
	// TPM holds: the file belongs to another TPM, or the TPM's counter was
	// replaced.
	ErrAnchorAhead = errors.New("anchor file is ahead of the TPM counter")
	// ErrAnchorNotInitialized means neither the anchor file nor the NV index
	// exists: the host was never initialised with an anchor.
	ErrAnchorNotInitialized = errors.New("rollback anchor not initialized")
	// ErrAnchorFileMissing means the TPM holds vtpmm's anchor index but the
	// data directory has no anchor file: the directory was replaced or the
	// file deleted.
	ErrAnchorFileMissing = errors.New("anchor file missing while the TPM holds the anchor")
	// ErrAnchorMissing means the anchor file exists but the TPM has no
	// anchor index (the TPM was cleared, or this is another TPM).
	ErrAnchorMissing = errors.New("TPM holds no rollback anchor")
	// ErrAnchorExists means init found an anchor already (file or index).
	ErrAnchorExists = errors.New("rollback anchor already initialized")
	// ErrAnchorConflict means the NV index is defined with other attributes
	// or another authValue: another program or another vault owns it.
	ErrAnchorConflict = errors.New("anchor NV index is owned by something else")
	// ErrAnchorBusy means a VM is part of an anchor change that is not
	// settled yet.
	ErrAnchorBusy = errors.New("VM has an unsettled anchor change")
	// ErrAcceptIncomplete means an anchor acceptance lacks its operator,
	// reason or audit sink.
	ErrAcceptIncomplete = errors.New("anchor acceptance needs an operator, a reason and an audit sink")
)
