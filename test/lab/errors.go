package lab

import "errors"

// Errors of the harness.
var (
	// ErrMissing means a prerequisite (root, a binary, a user) is missing.
	ErrMissing = errors.New("lab prerequisite missing")
	// ErrDaemon means a host's libvirtd did not come up.
	ErrDaemon = errors.New("lab libvirtd did not come up")
)
