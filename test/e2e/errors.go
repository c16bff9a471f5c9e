package e2e

import "errors"

// Errors of the harness.
var (
	// ErrMissing means a prerequisite (root, a binary, a user) is missing.
	ErrMissing = errors.New("e2e prerequisite missing")
	// ErrDaemon means a host's libvirtd did not come up.
	ErrDaemon = errors.New("e2e libvirtd did not come up")
)
