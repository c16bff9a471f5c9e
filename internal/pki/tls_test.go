package pki

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// hostFiles are the files of one issued host certificate.
type hostFiles struct{ ca, cert, key string }

func issueFiles(t *testing.T, caDir string, ca *CA, host string, opts IssueOptions) hostFiles {
	t.Helper()
	out := t.TempDir()
	certPath, keyPath, err := ca.IssueToDir(host, out, opts)
	if err != nil {
		t.Fatal(err)
	}
	return hostFiles{ca: filepath.Join(caDir, CACertFile), cert: certPath, key: keyPath}
}

type handshakeResult struct {
	serverErr, clientErr error
	serverSeesHost       string // PeerHost on the server side
	clientSeesHost       string // PeerHost on the client side
	version              uint16
}

// handshake runs a real TLS handshake over loopback TCP and one round trip
// of application data, so that a client certificate refused by the server
// (reported after the client's TLS 1.3 handshake returns) surfaces too.
func handshake(t *testing.T, serverCfg, clientCfg *tls.Config) handshakeResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type srvOut struct {
		err  error
		host string
	}
	done := make(chan srvOut, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			done <- srvOut{err: err}
			return
		}
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
		sc := tls.Server(conn, serverCfg)
		if err := sc.HandshakeContext(ctx); err != nil {
			done <- srvOut{err: err}
			return
		}
		host, err := PeerHost(sc.ConnectionState())
		if err != nil {
			done <- srvOut{err: err}
			return
		}
		buf := make([]byte, 4)
		if _, err := io.ReadFull(sc, buf); err != nil {
			done <- srvOut{err: err}
			return
		}
		_, err = sc.Write([]byte("pong"))
		done <- srvOut{err: err, host: host}
	}()

	var res handshakeResult
	d := tls.Dialer{Config: clientCfg}
	conn, err := d.DialContext(ctx, "tcp", ln.Addr().String())
	if err == nil {
		cc := conn.(*tls.Conn)
		st := cc.ConnectionState()
		res.version = st.Version
		res.clientSeesHost, err = PeerHost(st)
		if err == nil {
			_ = cc.SetDeadline(time.Now().Add(10 * time.Second))
			_, err = cc.Write([]byte("ping"))
		}
		if err == nil {
			buf := make([]byte, 4)
			_, err = io.ReadFull(cc, buf)
		}
		cc.Close()
	}
	res.clientErr = err
	s := <-done
	res.serverErr, res.serverSeesHost = s.err, s.host
	return res
}

func TestHandshake(t *testing.T) {
	caDir, otherDir := t.TempDir(), t.TempDir()
	ca, err := InitCA(caDir, CAOptions{})
	if err != nil {
		t.Fatal(err)
	}
	other, err := InitCA(otherDir, CAOptions{Name: "rogue CA"})
	if err != nil {
		t.Fatal(err)
	}
	hostA := issueFiles(t, caDir, ca, "host-a", IssueOptions{})
	hostB := issueFiles(t, caDir, ca, "host-b", IssueOptions{})
	rogue := issueFiles(t, otherDir, other, "host-a", IssueOptions{})
	expired := issueFiles(t, caDir, ca, "host-a", IssueOptions{Now: fixedClock(time.Now().Add(-48 * time.Hour)), Validity: time.Hour})

	// Certificates from another CA or expired ones cannot be loaded through
	// ServerTLS/ClientTLS (the issuer is checked at load time), so the
	// peers under test present them through hand-built configurations.
	presenting := func(f hostFiles) tls.Certificate {
		c, err := tls.LoadX509KeyPair(f.cert, f.key)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	server := func(f hostFiles, present *hostFiles) *tls.Config {
		cfg, err := ServerTLS(f.ca, f.cert, f.key)
		if err != nil {
			t.Fatal(err)
		}
		if present != nil {
			cfg.Certificates = []tls.Certificate{presenting(*present)}
		}
		return cfg
	}
	client := func(f hostFiles, name string, present *hostFiles) *tls.Config {
		cfg, err := ClientTLS(f.ca, f.cert, f.key, name)
		if err != nil {
			t.Fatal(err)
		}
		if present != nil {
			// GetClientCertificate makes the client send the certificate
			// even when its issuer is not among the server's acceptable CAs.
			c := presenting(*present)
			cfg.Certificates = nil
			cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &c, nil }
		}
		return cfg
	}

	tests := []struct {
		name          string
		server        *tls.Config
		client        *tls.Config
		wantServerErr string // substring; "" means success
		wantClientErr string
	}{
		{"mutual TLS between two issued hosts", server(hostB, nil), client(hostA, "host-b", nil), "", ""},
		{"client certificate from another CA", server(hostB, nil), client(hostA, "host-b", &rogue),
			"certificate signed by unknown authority", "unknown certificate authority"},
		{"server certificate from another CA", server(hostB, &rogue), client(hostA, "host-a", nil),
			"bad certificate", "certificate signed by unknown authority"},
		{"expired client certificate", server(hostB, nil), client(hostA, "host-b", &expired),
			"expired", "certificate"},
		{"expired server certificate", server(hostB, &expired), client(hostA, "host-a", nil),
			"bad certificate", "expired"},
		{"server name mismatch", server(hostB, nil), client(hostA, "host-c", nil),
			"bad certificate", "not host-c"},
		{"client without certificate", server(hostB, nil), func() *tls.Config {
			c := client(hostA, "host-b", nil)
			c.Certificates = nil
			return c
		}(), "didn't provide a certificate", "certificate required"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := handshake(t, tt.server, tt.client)
			check := func(side string, err error, want string) {
				t.Helper()
				switch {
				case want == "" && err != nil:
					t.Errorf("%s: %v", side, err)
				case want != "" && err == nil:
					t.Errorf("%s: succeeded, want an error with %q", side, want)
				case want != "" && !strings.Contains(err.Error(), want):
					t.Errorf("%s: %v, want %q", side, err, want)
				}
			}
			check("server", r.serverErr, tt.wantServerErr)
			check("client", r.clientErr, tt.wantClientErr)
			if tt.wantServerErr == "" {
				if r.serverSeesHost != "host-a" || r.clientSeesHost != "host-b" {
					t.Errorf("PeerHost: server sees %q, client sees %q", r.serverSeesHost, r.clientSeesHost)
				}
				if r.version != tls.VersionTLS13 {
					t.Errorf("TLS version %x", r.version)
				}
			}
		})
	}
}

func TestTLSConfigErrors(t *testing.T) {
	caDir, otherDir := t.TempDir(), t.TempDir()
	ca, err := InitCA(caDir, CAOptions{})
	if err != nil {
		t.Fatal(err)
	}
	other, err := InitCA(otherDir, CAOptions{})
	if err != nil {
		t.Fatal(err)
	}
	a := issueFiles(t, caDir, ca, "host-a", IssueOptions{})
	b := issueFiles(t, caDir, ca, "host-b", IssueOptions{})
	rogue := issueFiles(t, otherDir, other, "host-a", IssueOptions{})
	missing := filepath.Join(t.TempDir(), "nope.crt")
	garbage := filepath.Join(t.TempDir(), "garbage.pem")
	if err := os.WriteFile(garbage, []byte("not pem"), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name             string
		ca, cert, key    string
		wantErr          error
		wantMsg          string
		serverName       string
		clientOnlyErrors bool
	}{
		{"missing CA file", missing, a.cert, a.key, fs.ErrNotExist, missing, "host-b", false},
		{"missing certificate file", a.ca, missing, a.key, fs.ErrNotExist, missing, "host-b", false},
		{"missing key file", a.ca, a.cert, missing, fs.ErrNotExist, missing, "host-b", false},
		{"CA file not PEM", garbage, a.cert, a.key, ErrNoCertificate, garbage, "host-b", false},
		{"key not PEM", a.ca, a.cert, garbage, ErrBadKey, garbage, "host-b", false},
		{"key of another host", a.ca, a.cert, b.key, ErrBadKey, "does not match", "host-b", false},
		{"certificate of another CA", a.ca, rogue.cert, rogue.key, ErrNotIssuedByCA, "not signed by", "host-b", false},
		{"empty server name", a.ca, a.cert, a.key, ErrInvalidHost, "server name", "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var errs []error
			if !tt.clientOnlyErrors {
				_, err := ServerTLS(tt.ca, tt.cert, tt.key)
				errs = append(errs, err)
			}
			_, err := ClientTLS(tt.ca, tt.cert, tt.key, tt.serverName)
			errs = append(errs, err)
			for _, err := range errs {
				if !errors.Is(err, tt.wantErr) || !strings.Contains(err.Error(), tt.wantMsg) {
					t.Errorf("err %v, want %v mentioning %q", err, tt.wantErr, tt.wantMsg)
				}
				if err != nil && strings.Contains(err.Error(), "PRIVATE KEY") {
					t.Errorf("error shows key material: %v", err)
				}
			}
		})
	}
}

func TestPeerHostUnverified(t *testing.T) {
	if _, err := PeerHost(tls.ConnectionState{}); !errors.Is(err, ErrNoVerifiedPeer) {
		t.Errorf("err %v", err)
	}
}
