// Package registrytest starts real etcd clusters for tests: N embedded
// members in this process on loopback ports it picks, each with a fleet
// certificate from its own test CA, and hands out registry configurations
// for hosts, for the operator and for strangers (a certificate of another
// CA). Never a mock of etcd.
package registrytest

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/internal/pki"
	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/migrate/registry/member"
)

// Options configures a test cluster. Zero values take test defaults.
type Options struct {
	Members   int                // default 1
	Spares    []string           // extra peer names (member replacement)
	TTL       time.Duration      // liveness lease TTL (default 1 s, etcd's minimum)
	OpTimeout time.Duration      // default 2 s
	Heartbeat time.Duration      // default 25 ms
	Election  time.Duration      // default 250 ms
	Log       logrus.FieldLogger // default: discard
}

// Cluster is a running test cluster. Its members are hosts "member-1" ...
// "member-N", each running its member through registry.ModeEmbedded.
type Cluster struct {
	tb      testing.TB
	Dir     string
	CA      *pki.CA
	CAFile  string
	Opts    Options
	Members []registry.Member

	mu      sync.Mutex
	running map[string]*registry.Client
	dirs    map[string]string
	used    map[string]bool
}

// Start starts the cluster and waits until every member is ready. Cleanup
// stops it.
func Start(tb testing.TB, opts Options) *Cluster {
	tb.Helper()
	if opts.Members == 0 {
		opts.Members = 1
	}
	if opts.TTL == 0 {
		opts.TTL = time.Second
	}
	if opts.OpTimeout == 0 {
		opts.OpTimeout = 2 * time.Second
	}
	if opts.Heartbeat == 0 {
		opts.Heartbeat = 25 * time.Millisecond
	}
	if opts.Election == 0 {
		opts.Election = 250 * time.Millisecond
	}
	if opts.Log == nil {
		l := logrus.New()
		l.SetOutput(io.Discard)
		opts.Log = l
	}
	dir := tb.TempDir()
	ca, err := pki.InitCA(filepath.Join(dir, "ca"), pki.CAOptions{Name: "registry test CA"})
	if err != nil {
		tb.Fatal(err)
	}
	c := &Cluster{tb: tb, Dir: dir, CA: ca, CAFile: filepath.Join(dir, "ca", pki.CACertFile), Opts: opts,
		running: map[string]*registry.Client{}, dirs: map[string]string{}, used: map[string]bool{}}
	for i := 1; i <= opts.Members; i++ {
		c.Members = append(c.Members, c.NewMember(fmt.Sprintf("member-%d", i)))
	}
	tb.Cleanup(c.Close)
	var wg sync.WaitGroup
	errs := make([]error, len(c.Members))
	for i, m := range c.Members {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = c.StartMember(m.Name, c.Members, "new")
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			tb.Fatal(err)
		}
	}
	return c
}

// NewMember picks free loopback ports for a member named name, never one
// handed out before (a stopped member's client port must not become a new
// member's peer port while clients still dial it).
func (c *Cluster) NewMember(name string) registry.Member {
	return registry.Member{Name: name, PeerURL: "https://" + c.freeAddr(), ClientURL: "https://" + c.freeAddr()}
}

func (c *Cluster) freeAddr() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	for {
		addr, err := FreeAddr()
		if err != nil {
			c.tb.Fatal(err)
		}
		if !c.used[addr] {
			c.used[addr] = true
			return addr
		}
	}
}

// Cert issues (once) a fleet certificate for host and returns its files.
func (c *Cluster) Cert(host string) (certFile, keyFile string) {
	dir := filepath.Join(c.Dir, "certs")
	certFile, keyFile = filepath.Join(dir, host+".crt"), filepath.Join(dir, host+".key")
	if _, err := os.Stat(certFile); err == nil {
		return certFile, keyFile
	}
	if _, _, err := c.CA.IssueToDir(host, dir, pki.IssueOptions{}); err != nil {
		c.tb.Fatal(err)
	}
	return certFile, keyFile
}

// MemberConfig is the ModeEmbedded configuration of member name with the
// given initial cluster and state ("new" or "existing").
func (c *Cluster) MemberConfig(name string, members []registry.Member, state string) registry.Config {
	cert, key := c.Cert(name)
	c.mu.Lock()
	d, ok := c.dirs[name]
	if !ok {
		d = filepath.Join(c.Dir, "data", name)
		c.dirs[name] = d
	}
	c.mu.Unlock()
	return registry.Config{
		Mode: registry.ModeEmbedded, Host: name, TTL: c.Opts.TTL, OpTimeout: c.Opts.OpTimeout,
		CAFile: c.CAFile, CertFile: cert, KeyFile: key, Log: c.Opts.Log, StartMember: member.Start,
		Embedded: registry.Embedded{
			DataDir: d, Members: members, ClusterState: state, PeerNames: c.Opts.Spares,
			HeartbeatInterval: c.Opts.Heartbeat, ElectionTimeout: c.Opts.Election,
		},
	}
}

// StartMember starts (or restarts, on its old data directory) member name
// and waits until it is ready or 20 s passed.
func (c *Cluster) StartMember(name string, members []registry.Member, state string) error {
	cl, err := registry.OpenClient(context.Background(), c.MemberConfig(name, members, state))
	if err != nil {
		return err
	}
	select {
	case <-cl.Ready():
	case err := <-cl.Err():
		cl.Close()
		return fmt.Errorf("member %s: %w", name, err)
	case <-time.After(20 * time.Second):
		cl.Close()
		return fmt.Errorf("member %s: not ready after 20 s", name)
	}
	c.mu.Lock()
	c.running[name] = cl
	c.mu.Unlock()
	return nil
}

// StopMember stops a member (its data directory stays).
func (c *Cluster) StopMember(name string) {
	c.mu.Lock()
	cl := c.running[name]
	delete(c.running, name)
	c.mu.Unlock()
	if cl != nil {
		cl.Close()
	}
}

// WipeMember removes a stopped member's data directory (a lost disk).
func (c *Cluster) WipeMember(name string) {
	c.mu.Lock()
	d := c.dirs[name]
	delete(c.dirs, name)
	c.mu.Unlock()
	if err := os.RemoveAll(d); err != nil {
		c.tb.Fatal(err)
	}
}

// Member returns the running member's own registry client.
func (c *Cluster) Member(name string) *registry.Client {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.running[name]
}

// Endpoints returns the client URLs of the given members (all when none).
func (c *Cluster) Endpoints(members ...registry.Member) []string {
	if len(members) == 0 {
		members = c.Members
	}
	var eps []string
	for _, m := range members {
		eps = append(eps, m.ClientURL)
	}
	return eps
}

// Config is the ModeEtcd configuration of a host (or the operator, host
// "root") reaching the cluster with its fleet certificate. It does not
// follow other hosts' changes (NoFollow): a member stops gracefully, and
// waits up to etcd's request timeout (5 s + 2 election timeouts) for open
// watch streams, which tests that stop members would pay each time; set
// NoFollow to false where the last view must follow.
func (c *Cluster) Config(host string) registry.Config {
	cert, key := c.Cert(host)
	return registry.Config{
		Mode: registry.ModeEtcd, Host: host, TTL: c.Opts.TTL, OpTimeout: c.Opts.OpTimeout,
		Endpoints: c.Endpoints(), CAFile: c.CAFile, CertFile: cert, KeyFile: key, Log: c.Opts.Log,
		NoFollow: true,
	}
}

// Open opens a client for host (closed at cleanup).
func (c *Cluster) Open(tb testing.TB, host string) *registry.Client {
	tb.Helper()
	return c.OpenConfig(tb, c.Config(host))
}

// OpenConfig opens a client with cfg (closed at cleanup).
func (c *Cluster) OpenConfig(tb testing.TB, cfg registry.Config) *registry.Client {
	tb.Helper()
	cl, err := registry.OpenClient(context.Background(), cfg)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { cl.Close() })
	return cl
}

// Identity returns a made-up TPM identity for host (hex digests).
func Identity(host string) registry.Identity {
	h := fmt.Sprintf("%x", host)
	pad := func(tag string) string {
		s := tag + h
		for len(s) < 64 {
			s += "0"
		}
		return s[:64]
	}
	return registry.Identity{EK: pad("e0"), AK: pad("a0"), MK: pad("d0")}
}

// Enroll enrols hosts through op (the operator's client) with Identity.
func Enroll(tb testing.TB, op registry.Fleet, hosts ...string) {
	tb.Helper()
	for _, h := range hosts {
		if err := op.Enroll(context.Background(), registry.Enrolment{Host: h, Identity: Identity(h)}); err != nil {
			tb.Fatal(err)
		}
	}
}

// Close stops every running member.
func (c *Cluster) Close() {
	c.mu.Lock()
	names := make([]string, 0, len(c.running))
	for n := range c.running {
		names = append(names, n)
	}
	c.mu.Unlock()
	var wg sync.WaitGroup
	for _, n := range names {
		wg.Add(1)
		go func() { defer wg.Done(); c.StopMember(n) }()
	}
	wg.Wait()
}
