package pki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"strings"
)

// ServerTLS returns a TLS 1.3-only server configuration presenting
// certFile/keyFile and requiring a client certificate that chains to the
// CA certificate(s) in caFile. Errors name the file that is missing or
// unusable; they never contain key material.
func ServerTLS(caFile, certFile, keyFile string) (*tls.Config, error) {
	const op = "server TLS"
	pool, cert, err := loadTLSFiles(caFile, certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		MaxVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    pool,
	}, nil
}

// ClientTLS returns a TLS 1.3-only client configuration presenting
// certFile/keyFile and accepting only a server whose certificate chains to
// the CA in caFile and is valid for serverName (a host name or IP).
func ClientTLS(caFile, certFile, keyFile, serverName string) (*tls.Config, error) {
	const op = "client TLS"
	if serverName == "" {
		return nil, fmt.Errorf("%s: empty server name: %w", op, ErrInvalidHost)
	}
	pool, cert, err := loadTLSFiles(caFile, certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		MaxVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		RootCAs:      pool,
		ServerName:   serverName,
	}, nil
}

// PeerHost returns the host name of the verified peer of a TLS connection:
// the subject CN of its leaf certificate, or its first DNS SAN when the CN
// is empty. Only verified chains count; an unverified peer certificate
// (InsecureSkipVerify, or no client certificate) gives ErrNoVerifiedPeer.
func PeerHost(state tls.ConnectionState) (string, error) {
	if len(state.VerifiedChains) == 0 || len(state.VerifiedChains[0]) == 0 {
		return "", fmt.Errorf("peer host: %w", ErrNoVerifiedPeer)
	}
	leaf := state.VerifiedChains[0][0]
	host := leaf.Subject.CommonName
	if host == "" && len(leaf.DNSNames) > 0 {
		host = leaf.DNSNames[0]
	}
	if err := validHost(host); err != nil {
		return "", fmt.Errorf("peer host: certificate %s: %w", leaf.Subject, err)
	}
	return host, nil
}

// loadTLSFiles reads the CA pool and the own key pair, and checks that the
// certificate matches the key and was issued by one of the CA certificates
// (a signature check only: expiry is left to the handshake).
func loadTLSFiles(caFile, certFile, keyFile string) (*x509.CertPool, tls.Certificate, error) {
	cas, _, err := readCertificates(caFile)
	if err != nil {
		return nil, tls.Certificate{}, err
	}
	pool := x509.NewCertPool()
	for _, c := range cas {
		pool.AddCert(c)
	}
	chain, _, err := readCertificates(certFile)
	if err != nil {
		return nil, tls.Certificate{}, err
	}
	key, err := readKey(keyFile)
	if err != nil {
		return nil, tls.Certificate{}, err
	}
	leaf := chain[0]
	if pub, ok := leaf.PublicKey.(*ecdsa.PublicKey); !ok || !key.PublicKey.Equal(pub) {
		return nil, tls.Certificate{}, fmt.Errorf("%s does not match %s: %w", keyFile, certFile, ErrBadKey)
	}
	issued := false
	for _, ca := range cas {
		if leaf.CheckSignatureFrom(ca) == nil {
			issued = true
			break
		}
	}
	if !issued {
		return nil, tls.Certificate{}, fmt.Errorf("%s is not signed by %s: %w", certFile, caFile, ErrNotIssuedByCA)
	}
	tc := tls.Certificate{PrivateKey: key, Leaf: leaf}
	for _, c := range chain {
		tc.Certificate = append(tc.Certificate, c.Raw)
	}
	return pool, tc, nil
}

// readCertificates parses every CERTIFICATE block of a PEM file. It
// returns them and the PEM bytes.
func readCertificates(path string) ([]*x509.Certificate, []byte, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, fmt.Errorf("read certificate: %w", err)
	}
	var certs []*x509.Certificate
	rest := data
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, nil, fmt.Errorf("%s: %w: %w", path, ErrNoCertificate, err)
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, nil, fmt.Errorf("%s: %w (expected PEM CERTIFICATE blocks)", path, ErrNoCertificate)
	}
	return certs, data, nil
}

// readKey reads an ECDSA P-256 private key (PKCS#8 or SEC 1 PEM). Errors
// name the file only, never its content.
func readKey(path string) (*ecdsa.PrivateKey, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read private key: %w", err)
	}
	b, _ := pem.Decode(data)
	if b == nil {
		return nil, fmt.Errorf("%s: no PEM block: %w", path, ErrBadKey)
	}
	var k crypto.PrivateKey
	switch b.Type {
	case "PRIVATE KEY":
		k, err = x509.ParsePKCS8PrivateKey(b.Bytes)
	case "EC PRIVATE KEY":
		k, err = x509.ParseECPrivateKey(b.Bytes)
	default:
		return nil, fmt.Errorf("%s: PEM type %q: %w", path, b.Type, ErrBadKey)
	}
	if err != nil {
		// The parser's message describes the structure, not the key bytes.
		return nil, fmt.Errorf("%s: %w: %v", path, ErrBadKey, err)
	}
	ek, ok := k.(*ecdsa.PrivateKey)
	if !ok || ek.Curve != elliptic.P256() {
		return nil, fmt.Errorf("%s: not an ECDSA P-256 key: %w", path, ErrBadKey)
	}
	return ek, nil
}

// validHost accepts DNS host names: 1 to 253 characters, dot-separated
// labels of 1 to 63 letters, digits and hyphens, not starting or ending
// with a hyphen. Host names become file names (HOST.crt), so this also
// keeps paths inside the output directory.
func validHost(h string) error {
	if h == "" || len(h) > 253 {
		return fmt.Errorf("%q: %w", h, ErrInvalidHost)
	}
	for _, label := range strings.Split(h, ".") {
		if len(label) == 0 || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return fmt.Errorf("%q: %w", h, ErrInvalidHost)
		}
		for _, r := range label {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-') {
				return fmt.Errorf("%q: %w", h, ErrInvalidHost)
			}
		}
	}
	return nil
}
