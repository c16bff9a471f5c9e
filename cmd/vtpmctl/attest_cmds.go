package main

import "github.com/spf13/cobra"

// attestCommands returns the attestation commands (ek, eventlog, evidence).
func attestCommands(e *env) []*cobra.Command { return nil }
