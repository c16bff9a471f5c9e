package pki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/vtpmm/vtpmm/internal/atomicfile"
)

// File names inside a CA directory.
const (
	CACertFile = "ca.crt"
	CAKeyFile  = "ca.key"
)

// Defaults for validity periods and clock skew.
const (
	DefaultCAValidity   = 10 * 365 * 24 * time.Hour
	DefaultLeafValidity = 365 * 24 * time.Hour
	// Backdate is subtracted from NotBefore so that hosts whose clocks lag
	// a little behind the CA still accept fresh certificates.
	Backdate = 5 * time.Minute
)

// CAOptions configures InitCA. Zero values take the defaults.
type CAOptions struct {
	Name     string           // subject CN; default "vtpmm development CA"
	Validity time.Duration    // default DefaultCAValidity
	Now      func() time.Time // default time.Now; also the CA's clock for Issue
}

// IssueOptions configures a leaf certificate. Zero values take defaults.
type IssueOptions struct {
	DNSNames []string // extra DNS SANs; the host name is always the first
	// IPs are the IP SANs. nil means 127.0.0.1 and ::1; an empty non-nil
	// slice means none.
	IPs      []net.IP
	Validity time.Duration    // default DefaultLeafValidity, capped at the CA's expiry
	Now      func() time.Time // default: the CA's clock
	// Overwrite lets IssueToDir replace an existing HOST.crt/HOST.key
	// (certificate renewal). Without it IssueToDir fails with ErrExists.
	Overwrite bool
}

// CA is a loaded certificate authority. Its private key never leaves the
// value except through the ca.key file written by InitCA.
type CA struct {
	cert    *x509.Certificate
	certPEM []byte
	key     *ecdsa.PrivateKey
	now     func() time.Time
}

// Certificate returns the CA certificate.
func (c *CA) Certificate() *x509.Certificate { return c.cert }

// CertPEM returns the PEM encoding of the CA certificate (what ca.crt holds).
func (c *CA) CertPEM() []byte { return append([]byte(nil), c.certPEM...) }

// InitCA creates a new self-signed ECDSA P-256 CA in dir (created with
// mode 0700 if missing): dir/ca.key and dir/ca.crt, both mode 0600. It
// fails with ErrExists when either file is already there.
//
// The existence check and the atomic writes are not one transaction: two
// operators running InitCA on the same directory at the same instant could
// race. The key is written before the certificate, so a crash leaves at
// worst a lone ca.key, which LoadCA rejects and InitCA refuses to replace.
func InitCA(dir string, opts CAOptions) (*CA, error) {
	const op = "init CA"
	if opts.Name == "" {
		opts.Name = "vtpmm development CA"
	}
	if opts.Validity == 0 {
		opts.Validity = DefaultCAValidity
	}
	if opts.Validity < 0 {
		return nil, fmt.Errorf("%s: validity %v: %w", op, opts.Validity, ErrInvalidOptions)
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	certPath, keyPath := filepath.Join(dir, CACertFile), filepath.Join(dir, CAKeyFile)
	for _, p := range []string{certPath, keyPath} {
		if _, err := os.Lstat(p); err == nil {
			return nil, fmt.Errorf("%s: %s: %w (refusing to overwrite)", op, p, ErrExists)
		} else if !errors.Is(err, fs.ErrNotExist) {
			return nil, fmt.Errorf("%s: %w", op, err)
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("%s: generate key: %w", op, err)
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	ski, err := subjectKeyID(key.Public())
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	now := opts.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: opts.Name, Organization: []string{"vtpmm"}},
		NotBefore:             now.Add(-Backdate),
		NotAfter:              now.Add(opts.Validity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
		SubjectKeyId:          ski,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("%s: sign: %w", op, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	keyPEM, err := encodeKey(key)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	if err := atomicfile.WriteFile(keyPath, keyPEM, 0o600); err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	if err := atomicfile.WriteFile(certPath, certPEM, 0o600); err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	return &CA{cert: cert, certPEM: certPEM, key: key, now: opts.Now}, nil
}

// LoadCA reads the CA in dir written by InitCA. It checks that ca.crt is a
// CA certificate and that ca.key is its private key. The loaded CA uses
// time.Now as its clock unless IssueOptions.Now is given.
func LoadCA(dir string) (*CA, error) {
	const op = "load CA"
	certPath, keyPath := filepath.Join(dir, CACertFile), filepath.Join(dir, CAKeyFile)
	certs, certPEM, err := readCertificates(certPath)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	cert := certs[0]
	if !cert.IsCA || !cert.BasicConstraintsValid {
		return nil, fmt.Errorf("%s: %s: not a CA certificate: %w", op, certPath, ErrNoCertificate)
	}
	key, err := readKey(keyPath)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	if !key.PublicKey.Equal(cert.PublicKey) {
		return nil, fmt.Errorf("%s: %s does not match %s: %w", op, keyPath, certPath, ErrBadKey)
	}
	return &CA{cert: cert, certPEM: certPEM, key: key, now: time.Now}, nil
}

// Issue creates a key pair and a certificate for host, usable for both
// server and client authentication. It returns PEM-encoded certificate and
// PKCS#8 private key; the caller must keep keyPEM secret.
func (c *CA) Issue(host string, opts IssueOptions) (certPEM, keyPEM []byte, err error) {
	op := "issue certificate for " + host
	if err := validHost(host); err != nil {
		return nil, nil, fmt.Errorf("%s: %w", op, err)
	}
	dns := []string{host}
	for _, d := range opts.DNSNames {
		if err := validHost(d); err != nil {
			return nil, nil, fmt.Errorf("%s: DNS name: %w", op, err)
		}
		if d != host {
			dns = append(dns, d)
		}
	}
	ips := opts.IPs
	if ips == nil {
		ips = []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback}
	}
	for _, ip := range ips {
		if ip.To16() == nil {
			return nil, nil, fmt.Errorf("%s: IP %v: %w", op, ip, ErrInvalidOptions)
		}
	}
	if opts.Validity == 0 {
		opts.Validity = DefaultLeafValidity
	}
	if opts.Validity < 0 {
		return nil, nil, fmt.Errorf("%s: validity %v: %w", op, opts.Validity, ErrInvalidOptions)
	}
	nowf := opts.Now
	if nowf == nil {
		nowf = c.now
	}
	now := nowf()
	notAfter := now.Add(opts.Validity)
	if notAfter.After(c.cert.NotAfter) {
		notAfter = c.cert.NotAfter
	}
	if !notAfter.After(now) {
		return nil, nil, fmt.Errorf("%s: the CA expired at %s: %w", op, c.cert.NotAfter.Format(time.RFC3339), ErrInvalidOptions)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: generate key: %w", op, err)
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", op, err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: host, Organization: []string{"vtpmm"}},
		NotBefore:             now.Add(-Backdate),
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		DNSNames:              dns,
		IPAddresses:           ips,
		AuthorityKeyId:        c.cert.SubjectKeyId,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.cert, key.Public(), c.key)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: sign: %w", op, err)
	}
	keyPEM, err = encodeKey(key)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", op, err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), keyPEM, nil
}

// IssueToDir issues a certificate for host and writes dir/HOST.crt and
// dir/HOST.key (mode 0600, atomically; dir is created with mode 0700). It
// returns the two paths. Existing files are replaced only with
// opts.Overwrite; otherwise the error wraps ErrExists.
func (c *CA) IssueToDir(host, dir string, opts IssueOptions) (certPath, keyPath string, err error) {
	op := "issue certificate for " + host
	if err := validHost(host); err != nil {
		return "", "", fmt.Errorf("%s: %w", op, err)
	}
	certPath, keyPath = filepath.Join(dir, host+".crt"), filepath.Join(dir, host+".key")
	if !opts.Overwrite {
		for _, p := range []string{certPath, keyPath} {
			if _, err := os.Lstat(p); err == nil {
				return "", "", fmt.Errorf("%s: %s: %w (refusing to overwrite)", op, p, ErrExists)
			}
		}
	}
	certPEM, keyPEM, err := c.Issue(host, opts)
	if err != nil {
		return "", "", err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", "", fmt.Errorf("%s: %w", op, err)
	}
	if err := atomicfile.WriteFile(keyPath, keyPEM, 0o600); err != nil {
		return "", "", fmt.Errorf("%s: %w", op, err)
	}
	if err := atomicfile.WriteFile(certPath, certPEM, 0o600); err != nil {
		return "", "", fmt.Errorf("%s: %w", op, err)
	}
	return certPath, keyPath, nil
}

func randomSerial() (*big.Int, error) {
	s, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("serial number: %w", err)
	}
	return s.Add(s, big.NewInt(1)), nil
}

func subjectKeyID(pub crypto.PublicKey) ([]byte, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("subject key id: %w", err)
	}
	sum := sha256.Sum256(der)
	return sum[:20], nil
}

func encodeKey(key *ecdsa.PrivateKey) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("encode key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}
