package registry_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/migrate/registry/registrytest"
)

// TestOpenNone: mode none (or no mode) is a nil Registry, nothing else.
func TestOpenNone(t *testing.T) {
	for _, m := range []registry.Mode{registry.ModeNone, ""} {
		r, err := registry.Open(context.Background(), registry.Config{Mode: m})
		if err != nil || r != nil {
			t.Fatalf("mode %q: %v, %v", m, r, err)
		}
	}
	_, err := registry.OpenClient(context.Background(), registry.Config{Mode: registry.ModeNone, Host: "h"})
	mustErrIs(t, err, registry.ErrConfig)
}

func TestConfigErrors(t *testing.T) {
	good := registry.Config{Mode: registry.ModeEtcd, Host: "host-a", Endpoints: []string{"https://127.0.0.1:2379"},
		CAFile: "ca", CertFile: "c", KeyFile: "k"}
	member := registry.Member{Name: "host-a", PeerURL: "https://127.0.0.1:2380", ClientURL: "https://127.0.0.1:2379"}
	emb := registry.Config{Mode: registry.ModeEmbedded, Host: "host-a", CAFile: "ca", CertFile: "c", KeyFile: "k",
		Embedded: registry.Embedded{DataDir: "/tmp/x", Members: []registry.Member{member}}}
	tests := []struct {
		name string
		edit func(c *registry.Config)
		base registry.Config
	}{
		{"unknown mode", func(c *registry.Config) { c.Mode = "zookeeper" }, good},
		{"bad host", func(c *registry.Config) { c.Host = "a/b" }, good},
		{"no endpoints", func(c *registry.Config) { c.Endpoints = nil }, good},
		{"plain http endpoint", func(c *registry.Config) { c.Endpoints = []string{"http://127.0.0.1:2379"} }, good},
		{"no certificate", func(c *registry.Config) { c.CertFile = "" }, good},
		{"prefix without slash", func(c *registry.Config) { c.Prefix = "vtpmm" }, good},
		{"ttl under a second", func(c *registry.Config) { c.TTL = 1 }, good},
		{"tiny max_txn_ops", func(c *registry.Config) { c.MaxTxnOps = 2 }, good},
		{"embedded without data dir", func(c *registry.Config) { c.Embedded.DataDir = "" }, emb},
		{"embedded, self not a member", func(c *registry.Config) { c.Embedded.Name = "host-b" }, emb},
		{"embedded member twice", func(c *registry.Config) { c.Embedded.Members = append(c.Embedded.Members, member) }, emb},
		{"embedded bad cluster state", func(c *registry.Config) { c.Embedded.ClusterState = "old" }, emb},
		{"embedded election too short", func(c *registry.Config) {
			c.Embedded.HeartbeatInterval, c.Embedded.ElectionTimeout = 100e6, 200e6
		}, emb},
		{"embedded plain http listen_peer_url", func(c *registry.Config) { c.Embedded.ListenPeerURL = "http://0.0.0.0:2380" }, emb},
		{"embedded listen_client_url with a path", func(c *registry.Config) { c.Embedded.ListenClientURL = "https://0.0.0.0:2379/x" }, emb},
		{"embedded without TLS files", func(c *registry.Config) { c.CAFile = "" }, emb},
		{"missing CA file", func(c *registry.Config) {}, good},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := tt.base
			cfg.Embedded.Members = append([]registry.Member(nil), cfg.Embedded.Members...)
			tt.edit(&cfg)
			_, err := registry.OpenClient(context.Background(), cfg)
			mustErrIs(t, err, registry.ErrConfig)
		})
	}
}

// TestCacheFile: the last view survives a restart of the host, and a
// damaged cache file is refused with its name, not silently replaced.
func TestCacheFile(t *testing.T) {
	f := newFleet(t)
	file := filepath.Join(t.TempDir(), "registry-view.json")
	cfg := f.c.Config("host-a")
	cfg.CacheFile = file
	a, err := registry.OpenClient(f.ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.CreateVM(f.ctx, "vm-c", "host-a"); err != nil {
		t.Fatal(err)
	}
	want := a.Cached("vm-c")
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(file); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("cache file: %v %v", fi, err)
	}
	f.c.StopMember("member-1") // the registry is gone
	a2 := f.c.OpenConfig(t, cfg)
	got := a2.Cached("vm-c")
	if got.Rev != want.Rev || got.VMs["vm-c"] != want.VMs["vm-c"] || !got.Stale {
		t.Fatalf("after restart %+v, want %+v", got, want)
	}
	_, err = a2.VMs(f.ctx, "vm-c")
	mustErrIs(t, err, registry.ErrNoQuorum)
	a2.Close()

	if err := os.WriteFile(file, []byte(`{"v":1,"rev":3,"vms":[{"rev":9,"vm":{}}]}`), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = registry.OpenClient(f.ctx, cfg)
	mustErrIs(t, err, registry.ErrBadRecord)
}

// TestBatchLimits: a batch that does not fit one transaction is refused
// before anything is sent.
func TestBatchLimits(t *testing.T) {
	f := newFleet(t)
	var vms []registry.VMGen
	for i := 0; i < 127; i++ {
		vms = append(vms, gen("vm-"+string(rune('a'+i%26))+string(rune('a'+i/26)), 1))
	}
	n0 := f.a.RoundTrips()
	_, err := f.a.Commit(f.ctx, batch("tx", "host-a", "host-b", vms...))
	mustErrIs(t, err, registry.ErrBatchTooLarge)
	if n := f.a.RoundTrips() - n0; n != 0 {
		t.Fatalf("%d round trips for a refused batch", n)
	}
	_, err = f.a.Commit(f.ctx, batch("tx", "host-a", "host-b", gen("x", 1), gen("x", 1)))
	mustErrIs(t, err, registry.ErrBadRecord)
	_, err = f.a.Commit(f.ctx, batch("", "host-a", "host-a", gen("x", 1)))
	mustErrIs(t, err, registry.ErrBadRecord)

	// The server's limit (1024 in embedded members) when the client is
	// told a larger one.
	cfg := f.c.Config("host-a")
	cfg.MaxTxnOps = 4096
	big := f.c.OpenConfig(t, cfg)
	vms = vms[:0]
	for i := 0; i < 1100; i++ {
		vms = append(vms, gen(registrytest.Identity("x").EK[:8]+"-"+itoa(i), 1))
	}
	_, err = big.Commit(f.ctx, batch("tx", "host-a", "host-b", vms...))
	mustErrIs(t, err, registry.ErrBatchTooLarge)
}

func itoa(i int) string {
	const digits = "0123456789"
	if i < 10 {
		return digits[i : i+1]
	}
	return itoa(i/10) + digits[i%10:i%10+1]
}
