package main

import "errors"

// Sentinel errors of vtpmctl. Match them with errors.Is.
var (
	// errNotOurs means a domain's vTPM is not one vtpmm manages.
	errNotOurs = errors.New("not a vtpmm vTPM")
)
