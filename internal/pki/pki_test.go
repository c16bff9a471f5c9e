package pki

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

var t0 = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

func fixedClock(t time.Time) func() time.Time { return func() time.Time { return t } }

func parsePEMCert(t *testing.T, data []byte) *x509.Certificate {
	t.Helper()
	b, _ := pem.Decode(data)
	if b == nil || b.Type != "CERTIFICATE" {
		t.Fatalf("not a PEM certificate: %q", data)
	}
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func mode(t *testing.T, path string) fs.FileMode {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Mode().Perm()
}

func TestInitLoadCA(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	ca, err := InitCA(dir, CAOptions{Name: "test CA", Validity: 48 * time.Hour, Now: fixedClock(t0)})
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{CACertFile, CAKeyFile} {
		if m := mode(t, filepath.Join(dir, f)); m != 0o600 {
			t.Errorf("%s mode %v, want 0600", f, m)
		}
	}
	c := ca.Certificate()
	if !c.IsCA || c.Subject.CommonName != "test CA" || !c.MaxPathLenZero {
		t.Errorf("CA certificate: IsCA=%v CN=%q MaxPathLenZero=%v", c.IsCA, c.Subject.CommonName, c.MaxPathLenZero)
	}
	if pub, ok := c.PublicKey.(*ecdsa.PublicKey); !ok || pub.Curve != elliptic.P256() {
		t.Errorf("CA key is not ECDSA P-256: %T", c.PublicKey)
	}
	if !c.NotBefore.Equal(t0.Add(-Backdate)) || !c.NotAfter.Equal(t0.Add(48*time.Hour)) {
		t.Errorf("validity %v .. %v", c.NotBefore, c.NotAfter)
	}

	loaded, err := LoadCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !loaded.Certificate().Equal(c) || !bytes.Equal(loaded.CertPEM(), ca.CertPEM()) {
		t.Error("LoadCA returned another certificate")
	}

	if _, err := InitCA(dir, CAOptions{}); !errors.Is(err, ErrExists) {
		t.Errorf("second InitCA: %v, want ErrExists", err)
	}
	if _, err := LoadCA(t.TempDir()); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("LoadCA of an empty dir: %v, want ErrNotExist", err)
	}

	// A CA directory whose key belongs to another CA.
	otherDir := t.TempDir()
	if _, err := InitCA(otherDir, CAOptions{}); err != nil {
		t.Fatal(err)
	}
	mixed := t.TempDir()
	copyFile(t, filepath.Join(dir, CACertFile), filepath.Join(mixed, CACertFile))
	copyFile(t, filepath.Join(otherDir, CAKeyFile), filepath.Join(mixed, CAKeyFile))
	if _, err := LoadCA(mixed); !errors.Is(err, ErrBadKey) {
		t.Errorf("LoadCA with a foreign key: %v, want ErrBadKey", err)
	}
	// A leaf certificate is not a CA.
	leafDir := t.TempDir()
	if _, _, err := ca.IssueToDir("host-a", leafDir, IssueOptions{}); err != nil {
		t.Fatal(err)
	}
	copyFile(t, filepath.Join(leafDir, "host-a.crt"), filepath.Join(leafDir, CACertFile))
	copyFile(t, filepath.Join(leafDir, "host-a.key"), filepath.Join(leafDir, CAKeyFile))
	if _, err := LoadCA(leafDir); !errors.Is(err, ErrNoCertificate) {
		t.Errorf("LoadCA of a leaf: %v, want ErrNoCertificate", err)
	}
	if _, err := InitCA(t.TempDir(), CAOptions{Validity: -time.Hour}); !errors.Is(err, ErrInvalidOptions) {
		t.Errorf("negative validity: %v", err)
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	data, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestIssue(t *testing.T) {
	ca, err := InitCA(t.TempDir(), CAOptions{Validity: 30 * 24 * time.Hour, Now: fixedClock(t0)})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name     string
		host     string
		opts     IssueOptions
		wantErr  error
		wantDNS  []string
		wantIPs  []string
		notAfter time.Time
	}{
		{"defaults", "host-a", IssueOptions{}, nil, []string{"host-a"}, []string{"127.0.0.1", "::1"}, t0.Add(30 * 24 * time.Hour)},
		{"extra names and IPs", "host-b", IssueOptions{DNSNames: []string{"host-b.lab", "host-b"}, IPs: []net.IP{net.ParseIP("10.0.0.2")}, Validity: time.Hour},
			nil, []string{"host-b", "host-b.lab"}, []string{"10.0.0.2"}, t0.Add(time.Hour)},
		{"no IPs", "host-c", IssueOptions{IPs: []net.IP{}}, nil, []string{"host-c"}, nil, t0.Add(30 * 24 * time.Hour)},
		{"validity capped at the CA", "host-d", IssueOptions{Validity: 1000 * 24 * time.Hour}, nil, []string{"host-d"}, []string{"127.0.0.1", "::1"}, t0.Add(30 * 24 * time.Hour)},
		{"empty host", "", IssueOptions{}, ErrInvalidHost, nil, nil, time.Time{}},
		{"path in host", "../etc/x", IssueOptions{}, ErrInvalidHost, nil, nil, time.Time{}},
		{"slash in host", "a/b", IssueOptions{}, ErrInvalidHost, nil, nil, time.Time{}},
		{"leading hyphen", "-a", IssueOptions{}, ErrInvalidHost, nil, nil, time.Time{}},
		{"empty label", "a..b", IssueOptions{}, ErrInvalidHost, nil, nil, time.Time{}},
		{"bad extra DNS name", "host-a", IssueOptions{DNSNames: []string{"x y"}}, ErrInvalidHost, nil, nil, time.Time{}},
		{"bad IP", "host-a", IssueOptions{IPs: []net.IP{{1, 2, 3}}}, ErrInvalidOptions, nil, nil, time.Time{}},
		{"negative validity", "host-a", IssueOptions{Validity: -time.Second}, ErrInvalidOptions, nil, nil, time.Time{}},
		{"CA expired", "host-a", IssueOptions{Now: fixedClock(t0.Add(31 * 24 * time.Hour))}, ErrInvalidOptions, nil, nil, time.Time{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			certPEM, keyPEM, err := ca.Issue(tt.host, tt.opts)
			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("err %v, want %v", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			c := parsePEMCert(t, certPEM)
			if c.Subject.CommonName != tt.host {
				t.Errorf("CN %q", c.Subject.CommonName)
			}
			if strings.Join(c.DNSNames, ",") != strings.Join(tt.wantDNS, ",") {
				t.Errorf("DNS SANs %v, want %v", c.DNSNames, tt.wantDNS)
			}
			var ips []string
			for _, ip := range c.IPAddresses {
				ips = append(ips, ip.String())
			}
			if strings.Join(ips, ",") != strings.Join(tt.wantIPs, ",") {
				t.Errorf("IP SANs %v, want %v", ips, tt.wantIPs)
			}
			if !c.NotAfter.Equal(tt.notAfter) {
				t.Errorf("NotAfter %v, want %v", c.NotAfter, tt.notAfter)
			}
			if len(c.ExtKeyUsage) != 2 || c.ExtKeyUsage[0] != x509.ExtKeyUsageServerAuth || c.ExtKeyUsage[1] != x509.ExtKeyUsageClientAuth {
				t.Errorf("ExtKeyUsage %v", c.ExtKeyUsage)
			}
			if c.IsCA {
				t.Error("leaf is a CA")
			}
			if err := c.CheckSignatureFrom(ca.Certificate()); err != nil {
				t.Error(err)
			}
			if b, _ := pem.Decode(keyPEM); b == nil || b.Type != "PRIVATE KEY" {
				t.Error("key is not a PKCS#8 PEM block")
			}
		})
	}
}

func TestIssueToDir(t *testing.T) {
	ca, err := InitCA(t.TempDir(), CAOptions{})
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "certs")
	certPath, keyPath, err := ca.IssueToDir("host-a", out, IssueOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if certPath != filepath.Join(out, "host-a.crt") || keyPath != filepath.Join(out, "host-a.key") {
		t.Errorf("paths %s %s", certPath, keyPath)
	}
	for _, p := range []string{certPath, keyPath} {
		if m := mode(t, p); m != 0o600 {
			t.Errorf("%s mode %v", p, m)
		}
	}
	before, _ := os.ReadFile(keyPath)
	if _, _, err := ca.IssueToDir("host-a", out, IssueOptions{}); !errors.Is(err, ErrExists) {
		t.Errorf("second issue: %v, want ErrExists", err)
	}
	if _, _, err := ca.IssueToDir("host-a", out, IssueOptions{Overwrite: true}); err != nil {
		t.Fatal(err)
	}
	after, _ := os.ReadFile(keyPath)
	if bytes.Equal(before, after) {
		t.Error("Overwrite kept the old key")
	}
	if _, _, err := ca.IssueToDir("../escape", out, IssueOptions{}); !errors.Is(err, ErrInvalidHost) {
		t.Errorf("escaping host: %v", err)
	}
}
