package main

import "errors"

// Sentinel errors of vtpmctl. Match them with errors.Is.
var (
	// errUnreachable means the local vtpmd's admin socket did not answer.
	errUnreachable = errors.New("cannot reach vtpmd")
	// errNotOurs means a domain's vTPM is not one vtpmm manages.
	errNotOurs = errors.New("not a vtpmm vTPM")
)
