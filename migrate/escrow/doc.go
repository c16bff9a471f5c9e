// Package escrow owns vtpmm's backup bundles: the escrow of a VM's vTPM
// key to offline custodians, k of n.
//
// A bundle holds one VM's vTPM state (opaque: already encrypted under the
// VM key), its VM key sealed (AES-256-GCM) under a fresh bundle key, and
// that bundle key split by Shamir's scheme over GF(2^8) into n shares, each
// encrypted with age to one custodian's recipients (X25519, ML-KEM-768 +
// X25519 hybrids, tagged hardware keys, or age plugins). Any k custodians
// together restore the key; fewer learn nothing about it. Every header
// byte is associated data of the sealed key and the state is bound by its
// SHA-256, so a bundle changed anywhere fails to open, naming the part.
//
// The package owns: recipient and identity parsing (Recipient, Identity,
// Config), the custodian policy (Policy), sealing (Sealer.Seal, 0 TPM
// commands: it has no TPM), opening (Open), the bundle format (Header,
// Inspect), the backup directory layout and retention (Layout, Retain,
// Writer), and the pure decisions of a restore (PlanRestore,
// Opened.Release). The scheduler, the registry and the wrapping for the
// destination's TPM belong to the daemon, the registry and migrate; see
// docs/escrow.md. Nothing here logs except through the logger given.
package escrow
