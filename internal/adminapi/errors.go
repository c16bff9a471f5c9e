package adminapi

import "errors"

// Sentinel errors of package adminapi.
var (
	// ErrUnreachable means the local vtpmd's admin socket did not answer.
	// Only a failed connection counts: no socket, or nobody listening on
	// it (vtpmd is not running).
	ErrUnreachable = errors.New("cannot reach vtpmd")
	// ErrNoAnswer means vtpmd accepted the connection (or the connection
	// attempt ran out of time) but sent no complete answer before the
	// caller's deadline, or the connection broke before it: vtpmd runs but
	// is slow or stuck. It is not ErrUnreachable: the qemu hook lets a
	// start go on without vtpmd only when vtpmd is down.
	ErrNoAnswer = errors.New("vtpmd did not answer")
	// ErrProtocol means vtpmd's answer could not be read (a bad stream line,
	// a stream that ended early, a body that is not the expected JSON).
	ErrProtocol = errors.New("unexpected answer from vtpmd")
)
