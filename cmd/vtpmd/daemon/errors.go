package daemon

import (
	"errors"

	"github.com/vtpmm/vtpmm/vtpm/host"
)

// Sentinel errors of package daemon.
var (
	// ErrConfig means the configuration is invalid; the message names the
	// field. It is host.ErrConfig: one meaning of "invalid configuration".
	ErrConfig = host.ErrConfig
	// ErrClosed means the daemon was closed.
	ErrClosed = errors.New("daemon closed")
)
