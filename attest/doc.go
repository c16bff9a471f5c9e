// Package attest is the verifier side of vtpmm attestation. It owns:
//
//   - the Evidence bundle a destination host sends (its versioned encoding and
//     decoding, with size limits);
//   - lenient EK certificate parsing and chain verification against a root
//     store of manufacturer certificates (real vendor certificates that
//     crypto/x509 refuses are handled; every signature is still checked);
//   - parsing and replay of TCG PC Client event logs (crypto-agile and legacy
//     SHA-1) and the facts extracted from them (Secure Boot, boot components);
//   - verification of TPM2_Quote and TPM2_Certify structures (TPMS_ATTEST),
//     including the migration key's attributes and policy;
//   - the verifier side of credential activation (challenge, answer check)
//     and enrolment records;
//   - the operator policy format and the Verifier that applies every rule in
//     a fixed order and explains its decision.
//
// The package holds no TPM, no cgo and no libvirt: it only reads bytes. Every
// refusal is a *RefusalError that unwraps to one sentinel per rule (see
// errors.go); callers match with errors.Is / errors.As.
package attest
