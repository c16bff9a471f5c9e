package swtpm

import (
	"errors"

	"github.com/vtpmm/vtpmm/internal/errclass"
)

// Sentinel errors of package swtpm. Match them with errors.Is.
var (
	// ErrNotInstalled means swtpm or swtpm_setup is not installed.
	ErrNotInstalled = errors.New("swtpm is not installed (Debian: apt-get install swtpm swtpm-tools)")
	// ErrBadConfig means a SetupConfig or ProcessConfig is incomplete or invalid.
	ErrBadConfig = errors.New("invalid swtpm config")
	// ErrSetup means swtpm_setup failed.
	ErrSetup = errors.New("swtpm_setup failed")
	// ErrStart means the swtpm process did not start or did not answer.
	ErrStart = errors.New("swtpm did not start")
	// ErrWrongPassphrase means swtpm could not decrypt the TPM state (or a
	// state blob) with the passphrase it was given.
	ErrWrongPassphrase = errors.New("vTPM state does not decrypt with this passphrase")
	// ErrCtrl means the control channel failed (I/O or protocol).
	ErrCtrl = errors.New("swtpm control channel error")
	// ErrTPMResult means swtpm answered a control command with a non-zero
	// TPM result; the concrete error is a *ResultError.
	ErrTPMResult = errors.New("swtpm control command failed")
	// ErrNotEncrypted means state (on disk or exported) is not encrypted.
	ErrNotEncrypted = errors.New("vTPM state is not encrypted")
	// ErrBadStateBlob means a state file or blob has an unknown format.
	ErrBadStateBlob = errors.New("malformed swtpm state blob")
	// ErrStateInUse means a running swtpm holds the vTPM state directory
	// (its lock file): the state cannot be re-encrypted under it. Class
	// in-use (internal/errclass).
	ErrStateInUse = errclass.Mark(errclass.InUse, "vTPM state in use by a running swtpm")
	// ErrRekeyState means a vTPM's state directory is in the middle of an
	// unfinished rekey (or its layout is inconsistent): run RecoverRekey.
	// Class damaged (internal/errclass).
	ErrRekeyState = errclass.Mark(errclass.Damaged, "vTPM rekey unfinished")
)

// ResultError is a non-zero TPM result returned by a control command.
type ResultError struct {
	Cmd  Command
	Code uint32
}

func (e *ResultError) Error() string {
	return "swtpm " + e.Cmd.String() + ": TPM result " + hex32(e.Code) + resultText(e.Code)
}

// Is matches ErrTPMResult, and ErrWrongPassphrase for TPM_DECRYPT_ERROR.
func (e *ResultError) Is(target error) bool {
	return target == ErrTPMResult || (target == ErrWrongPassphrase && e.Code == rcDecryptError)
}
