package registry

import "errors"

// Sentinel errors of package registry. Errors are wrapped with the
// operation and the VM or host involved; match them with errors.Is. A
// refused compare-and-swap names every VM and the rule it failed.
var (
	// ErrNoQuorum means the registry could not be reached or has no
	// quorum: nothing was changed (or, for a change whose request reached
	// the leader, the outcome is unknown until a later read: CAS makes a
	// retry safe). Running VMs are not affected; Cached gives the last view.
	ErrNoQuorum = errors.New("registry unavailable (no quorum)")
	// ErrClosed means the Registry was closed.
	ErrClosed = errors.New("registry closed")
	// ErrNotFound means the record does not exist.
	ErrNotFound = errors.New("not found in the registry")
	// ErrExists means a record that may be written only once exists.
	ErrExists = errors.New("already exists in the registry")
	// ErrWrongOwner (rule owner): the VM is owned by another host than the
	// one the change names.
	ErrWrongOwner = errors.New("VM is owned by another host")
	// ErrStaleGeneration (rule generation): the VM is at another
	// generation than the change names; someone changed it first.
	ErrStaleGeneration = errors.New("stale generation")
	// ErrBusy (rule open-transaction): the VM has another (or no) open
	// transaction than the change names.
	ErrBusy = errors.New("VM has another open transaction")
	// ErrGenerationBounds (rule generation-bounds): the generation would
	// leave 1..MaxGeneration, or a bump would not raise it.
	ErrGenerationBounds = errors.New("generation out of bounds")
	// ErrHostFenced (rule host-fenced): a fenced host never becomes owner.
	ErrHostFenced = errors.New("host is fenced")
	// ErrHostNotActive (rule host-active): a migration may start only
	// towards an active (not draining, not fenced) host.
	ErrHostNotActive = errors.New("host is not active")
	// ErrNotEnrolled (rule enrolled): the host has no enrolment record.
	ErrNotEnrolled = errors.New("host is not enrolled")
	// ErrHostLive (rule owner-not-live): a takeover that requires the old
	// owner's liveness lease to be gone found it live.
	ErrHostLive = errors.New("host is still live")
	// ErrNotRetired (rule reenroll-needs-retired): a host's TPM identity
	// is replaced only while the host is fenced (vtpmctl host retire).
	ErrNotRetired = errors.New("host is not retired")
	// ErrSameIdentity (rule reenroll-new-identity): a re-enrolment
	// presented the identity the host is enrolled with: nothing to replace.
	ErrSameIdentity = errors.New("host is already enrolled with this TPM identity")
	// ErrIdentityRetired (rule identity-retired): a re-enrolment presented
	// (part of) a TPM identity the host was enrolled with before; a
	// replaced TPM (dead, stolen) is never trusted again.
	ErrIdentityRetired = errors.New("TPM identity was retired")
	// ErrConflict means a record changed between read and write (an
	// evacuation plan, a standby record); read again and retry.
	ErrConflict = errors.New("registry record changed concurrently")
	// ErrBatchTooLarge means a batch needs more operations than one etcd
	// transaction allows (Config.MaxTxnOps, etcd's --max-txn-ops).
	ErrBatchTooLarge = errors.New("batch too large for one registry transaction")
	// ErrBadRecord means a record failed strict decoding or validation.
	ErrBadRecord = errors.New("malformed registry record")
	// ErrConfig means the configuration is invalid.
	ErrConfig = errors.New("invalid registry configuration")
	// ErrPermission means etcd refused the operation to this identity
	// (RBAC: outside the host's keys, or not the operator).
	ErrPermission = errors.New("registry permission denied")
)

// ErrTLS means the registry refused this host's certificate, or presented
// one this host does not trust (another CA, a wrong name).
var ErrTLS = errors.New("registry TLS refused")
