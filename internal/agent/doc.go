// Package agent is the host agent behind vtpmd: it loads the configuration,
// opens the host TPM through a metered transport, unseals the vault once,
// and manages the VM vTPMs of this host (their keys in the key store, their
// swtpm state and processes). cmd/vtpmd is a thin CLI over it.
package agent
