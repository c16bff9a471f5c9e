package emuhost

import "errors"

// Sentinel errors of package emuhost. Match them with errors.Is.
var (
	// ErrNotInstalled means swtpm or one of its tools is not installed.
	ErrNotInstalled = errors.New("swtpm is not installed (Debian: apt-get install swtpm swtpm-tools)")
	// ErrSetup means swtpm_setup failed to manufacture the TPM.
	ErrSetup = errors.New("swtpm_setup failed")
	// ErrStart means the swtpm process did not start or did not answer.
	ErrStart = errors.New("swtpm did not start")
	// ErrStopped means the host's swtpm is not running.
	ErrStopped = errors.New("emulated host TPM is stopped")
	// ErrBadConfig means the Config is incomplete or invalid.
	ErrBadConfig = errors.New("invalid emulated host config")
	// ErrEventLog means an event log could not be parsed or replayed into this TPM.
	ErrEventLog = errors.New("event log cannot be booted")
)
