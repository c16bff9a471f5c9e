// Package pki is the development certificate authority for the mutual TLS
// between vtpmm agents (vtpmd) and the operator CLI (vtpmctl).
//
// InitCA creates a self-signed ECDSA P-256 CA in a directory (ca.crt and
// ca.key, both mode 0600, written atomically); LoadCA reads it back. The
// CA issues one leaf certificate per host: CN and first DNS SAN are the
// host name, the IP SANs default to the loopback addresses, and the
// extended key usages allow both server and client authentication, so one
// certificate serves an agent in both roles.
//
// ServerTLS and ClientTLS build TLS 1.3-only configurations that require
// and verify the peer's certificate against the CA; PeerHost tells the
// server which host is calling, from the verified chain only.
//
// This CA is meant for development, tests and small fleets. The CA key is
// a plain PKCS#8 file; production deployments should keep it offline or
// use their own PKI. Private keys are never logged or printed.
package pki
