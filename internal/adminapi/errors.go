package adminapi

import "errors"

// Sentinel errors of package adminapi.
var (
	// ErrUnreachable means the local vtpmd's admin socket did not answer.
	ErrUnreachable = errors.New("cannot reach vtpmd")
	// ErrProtocol means vtpmd's answer could not be read (a bad stream line,
	// a stream that ended early, a body that is not the expected JSON).
	ErrProtocol = errors.New("unexpected answer from vtpmd")
)
