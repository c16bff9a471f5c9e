package pki

import "errors"

// Sentinel errors of package pki. Errors are wrapped with the operation
// and the file involved; test them with errors.Is.
var (
	// ErrExists means a CA or host certificate is already in place; pki
	// never overwrites keys silently.
	ErrExists = errors.New("already exists")
	// ErrInvalidHost means a host name is empty or not a DNS name.
	ErrInvalidHost = errors.New("invalid host name")
	// ErrInvalidOptions means an option is out of range (validity, IP).
	ErrInvalidOptions = errors.New("invalid options")
	// ErrNoCertificate means a PEM file holds no usable certificate.
	ErrNoCertificate = errors.New("no certificate")
	// ErrBadKey means a private key file cannot be used (not PEM, not
	// ECDSA P-256, or not matching its certificate).
	ErrBadKey = errors.New("unusable private key")
	// ErrNotIssuedByCA means a certificate is not signed by the given CA.
	ErrNotIssuedByCA = errors.New("certificate not issued by the CA")
	// ErrNoVerifiedPeer means a TLS connection has no verified peer
	// certificate (handshake not done, or verification not required).
	ErrNoVerifiedPeer = errors.New("no verified peer certificate")
)
