package registry_test

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/internal/pki"
	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/migrate/registry/registrytest"
)

// TestRBAC: after Bootstrap a host's certificate reaches only vtpmm's
// prefix, and inside it only what a host needs; the operator (root) can do
// everything; a certificate without a user and a certificate of another
// CA get nothing.
func TestRBAC(t *testing.T) {
	c := registrytest.Start(t, registrytest.Options{})
	op := c.Open(t, "root")
	ctx := t.Context()
	// Something outside the prefix, written before authentication.
	if _, err := op.Etcd().Put(ctx, "/other/secret", "s"); err != nil {
		t.Fatal(err)
	}
	n, err := op.Bootstrap(ctx, registry.BootstrapOptions{Hosts: []string{"host-a", "host-b"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("bootstrap with 2 hosts: %d etcd requests", n)
	if _, err := op.Bootstrap(ctx, registry.BootstrapOptions{Hosts: []string{"host-a", "host-b"}}); err != nil {
		t.Fatalf("bootstrap again: %v", err)
	}
	registrytest.Enroll(t, op, "host-a", "host-b")
	a := c.Open(t, "host-a")

	// The honest twin: everything a host needs works.
	if err := a.Register(ctx, hostRecord("host-a")); err != nil {
		t.Fatal(err)
	}
	if _, err := a.CreateVM(ctx, "vm-1", "host-a"); err != nil {
		t.Fatal(err)
	}
	b := batch("tx1", "host-a", "host-b", gen("vm-1", 1))
	if _, err := a.Begin(ctx, b); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Commit(ctx, b); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Hosts(ctx); err != nil {
		t.Fatal(err)
	}
	if err := a.PutStandby(ctx, registry.Standby{VM: "vm-1", Host: "host-a", Generation: 2}); err != nil {
		t.Fatal(err)
	}
	if _, err := a.PutPlan(ctx, registry.Plan{Source: "host-a", State: "planned"}, 0); err != nil {
		t.Fatal(err)
	}

	// What a host may not do.
	raw := a.Etcd()
	pfx := registry.DefaultPrefix
	denied := []struct {
		name string
		do   func() error
	}{
		{"read outside the prefix", func() error { _, err := raw.Get(ctx, "/other/secret"); return err }},
		{"write outside the prefix", func() error { _, err := raw.Put(ctx, "/other/x", "x"); return err }},
		{"read everything", func() error { _, err := raw.Get(ctx, "", withFromKey()...); return err }},
		{"write another host's record", func() error { _, err := raw.Put(ctx, pfx+"hosts/host-b", "{}"); return err }},
		{"write another host's liveness", func() error { _, err := raw.Put(ctx, pfx+"live/host-b", "{}"); return err }},
		{"write another host's plan", func() error { _, err := raw.Put(ctx, pfx+"evac/host-b", "{}"); return err }},
		{"enrol a host", func() error {
			return a.Enroll(ctx, registry.Enrolment{Host: "host-x", Identity: registrytest.Identity("host-x")})
		}},
		{"un-fence or drain a host", func() error { return a.SetState(ctx, "host-a", registry.StateActive) }},
		{"take a snapshot", func() error { return a.Snapshot(ctx, &bytes.Buffer{}) }},
		{"add a user", func() error { _, err := a.AddHostUser(ctx, "host-x"); return err }},
		{"remove a member", func() error { return a.RemoveMember(ctx, "member-1") }},
	}
	for _, d := range denied {
		if err := d.do(); err == nil {
			t.Errorf("host-a could %s", d.name)
		} else if !errorsIs(err, registry.ErrPermission) && !isPermissionDenied(err) {
			t.Errorf("%s: error %v, want permission denied", d.name, err)
		}
	}

	// Nor re-enrol a retired host: its read passes the rules, its write is
	// refused.
	if err := op.SetState(ctx, "host-b", registry.StateFenced); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Reenroll(ctx, registry.Enrolment{Host: "host-b", Identity: registrytest.Identity("host-b2")}); !errorsIs(err, registry.ErrPermission) {
		t.Errorf("host-a re-enrolling host-b: %v, want permission denied", err)
	}

	// The operator can.
	if err := op.SetState(ctx, "host-b", registry.StateDraining); err != nil {
		t.Fatal(err)
	}
	var snap bytes.Buffer
	if err := op.Snapshot(ctx, &snap); err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(snap.Bytes(), []byte(pfx+"vms/vm-1")) {
		t.Fatal("snapshot lacks the VM record")
	}

	// A fleet certificate without a user (never bootstrapped) gets nothing.
	z := c.Open(t, "host-z")
	_, err = z.VMs(ctx)
	mustErrIs(t, err, registry.ErrPermission)

	// A certificate of another CA is refused at the TLS handshake.
	dir := t.TempDir()
	other, err := pki.InitCA(filepath.Join(dir, "ca"), pki.CAOptions{Name: "another CA"})
	if err != nil {
		t.Fatal(err)
	}
	cert, key, err := other.IssueToDir("host-a", filepath.Join(dir, "certs"), pki.IssueOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cfg := c.Config("host-a")
	cfg.CertFile, cfg.KeyFile = cert, key
	stranger := c.OpenConfig(t, cfg)
	_, err = stranger.VMs(ctx, "vm-1")
	mustErrIs(t, err, registry.ErrTLS)
	t.Logf("stranger: %v", err)
}

// TestPeerPortNames: a member's peer port (raft) accepts only fleet
// certificates valid for a member's name; any other host of the fleet is
// refused at the handshake.
func TestPeerPortNames(t *testing.T) {
	c := registrytest.Start(t, registrytest.Options{})
	get := func(host string) error {
		cert, key := c.Cert(host)
		cfg := c.Config(host)
		pair, err := tls.LoadX509KeyPair(cert, key)
		if err != nil {
			t.Fatal(err)
		}
		pool := x509.NewCertPool()
		caPEM, err := os.ReadFile(cfg.CAFile)
		if err != nil {
			t.Fatal(err)
		}
		pool.AppendCertsFromPEM(caPEM)
		hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{
			MinVersion: tls.VersionTLS13, RootCAs: pool, Certificates: []tls.Certificate{pair}}}}
		defer hc.CloseIdleConnections()
		resp, err := hc.Get(c.Members[0].PeerURL + "/version")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("status %s", resp.Status)
		}
		return nil
	}
	if err := get("member-1"); err != nil {
		t.Fatalf("a member's certificate: %v", err)
	}
	if err := get("host-x"); err == nil {
		t.Fatal("host-x's fleet certificate reached the peer port")
	}
}
