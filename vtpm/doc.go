// Package vtpm owns the TPM-holding side of one hypervisor host.
//
// It opens the host TPM by URI (Open), meters every command that crosses the
// transport (Meter, with latency profiles for firmware and discrete TPMs),
// seals the host vault key to the TPM under a PCR policy (Vault), and keeps
// each VM's vTPM state key on disk only as an AEAD envelope under the vault
// key (KeyStore). swtpm processes for VM vTPMs live in the swtpm
// sub-package; emulated "hardware" TPMs for tests and demos live in
// emuhost.
//
// Nothing in this package logs on its own: callers inject a
// logrus.FieldLogger where logging is wanted.
package vtpm
