package hypervisor

import (
	"errors"
	"fmt"
)

// Errors that classify hypervisor failures. libvirt's generic messages are
// mapped onto these so that a refusal says what went wrong.
var (
	// ErrNoDomain means the VM is not defined on this host.
	ErrNoDomain = errors.New("no such domain")
	// ErrNotRunning means the operation needs a running VM.
	ErrNotRunning = errors.New("domain is not running")
	// ErrSecretMissing means the destination has no vTPM secret for the VM
	// (libvirt: "Secret not found: no secret with matching uuid"); it fails
	// before any memory is copied.
	ErrSecretMissing = errors.New("destination lacks the vTPM secret")
	// ErrSecretMismatch means the destination's vTPM secret has a different
	// value; swtpm cannot decrypt the incoming state (libvirt: "job
	// 'migration out' unexpectedly failed", QEMU: "tpm-emulator: Setting the
	// stateblob (type 1) failed with a TPM error 0x21 decryption error").
	ErrSecretMismatch = errors.New("destination vTPM secret does not decrypt the vTPM state")
	// ErrUnreachable means the destination hypervisor could not be reached.
	ErrUnreachable = errors.New("destination hypervisor unreachable")
	// ErrMigrationFailed is any other migration failure.
	ErrMigrationFailed = errors.New("migration failed")
	// ErrHookRefused means a hook on the destination refused the incoming
	// migration before anything was copied (libvirt: "Hook script execution
	// failed", e.g. vtpmm's qemu hook when the destination is not trusted);
	// the hook's message follows.
	ErrHookRefused = errors.New("destination hook refused the migration")
	// ErrAlreadyExists means the VM is already defined on the destination.
	ErrAlreadyExists = errors.New("domain already exists on the destination")
	// ErrNoHypervisor means vtpmd runs without a hypervisor (None): nothing
	// can be migrated and no secret defined. It is a migration failure.
	ErrNoHypervisor = fmt.Errorf("%w: vtpmd runs without a hypervisor", ErrMigrationFailed)
	// ErrUnknownScheme means no Opener is registered for a hypervisor URI's
	// scheme (Registry.Open).
	ErrUnknownScheme = errors.New("unknown hypervisor URI scheme")
)
