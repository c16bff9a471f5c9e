// Package identity is the TPM side of vtpmm attestation: the host identity
// (EK public and certificate), the attestation key (AK), the migration key
// (MK) and the evidence producer.
//
// Keys are created once, at provisioning (Provision, vtpmd init), and made
// persistent with EvictControl:
//
//   - the AK, an ECC P-256 restricted signing key (ECDSA SHA-256), child of
//     the SRK, at DefaultAKHandle;
//   - the MK, an ECC P-256 restricted decryption (storage) key with
//     AES-128-CFB, child of the SRK, at DefaultMKHandle. It is the only key
//     a VM key is ever wrapped for (Wrap in software, Unwrap in the TPM).
//
// Everything else (LoadIdentity, ActivateCredential, Produce, Unwrap) only
// reads or uses those persistent handles: no CreatePrimary and no Create on
// a request path. Every transient object and session is flushed before the
// function returns, also on errors.
//
// The verifier side lives in package attest; Produce fills an
// attest.Evidence exactly as attest.Verifier expects it.
package identity
