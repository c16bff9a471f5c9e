// Package host owns the TPM-holding side of one hypervisor host as vtpmd
// runs it, without a daemon: the host's data directory (its layout as
// functions, Layout), provisioning (Init: the SRK, the vault sealed to the
// configured PCRs, the AK and the migration key), opening the metered host
// TPM and unsealing the vault once (Open, Recover), resealing, and the VM
// vTPMs of the host (their keys in the key store, their swtpm state and,
// on hosts without a hypervisor, their swtpm processes).
//
// 'vtpmd init', 'vtpmd vm create', 'vtpmd vault ...' and 'vtpmd evidence
// provision' use a Host directly; the daemon (cmd/vtpmd/daemon) holds one
// as a field. Nothing here knows the network, peers or the hypervisor.
package host
