package soak_test

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/internal/pki"
	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/migrate/registry/member"
	"github.com/vtpmm/vtpmm/migrate/registry/registrytest"
	"github.com/vtpmm/vtpmm/test/soak"
)

// TestPeerLinks: three real embedded etcd members that listen apart from
// the peer URLs they advertise (registry.Embedded.ListenPeerURL), with
// the soak's peer fronts in between. Cutting one member from the others
// leaves the two writable and the cut member refusing writes (no quorum
// on its side); cutting a second loses the quorum everywhere; healing
// brings writes back. Each state is tried by drop and by blackhole.
func TestPeerLinks(t *testing.T) {
	t.Parallel() // with the schedules: mostly waits on elections
	dir := t.TempDir()
	pkiDir := filepath.Join(dir, "pki")
	ca, err := pki.InitCA(pkiDir, pki.CAOptions{Name: "peer link test CA"})
	if err != nil {
		t.Fatal(err)
	}
	names := []string{"member-1", "member-2", "member-3"}
	for _, n := range append([]string{"root"}, names...) {
		if _, _, err := ca.IssueToDir(n, pkiDir, pki.IssueOptions{ClientOnly: n == "root"}); err != nil {
			t.Fatal(err)
		}
	}
	listen := map[string]string{}
	for _, n := range names {
		if listen[n], err = registrytest.FreeAddr(); err != nil {
			t.Fatal(err)
		}
	}
	pl, err := soak.NewPeerLinks(pkiDir, names, func(m string) string { return listen[m] })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pl.Close() })
	var members []registry.Member
	for _, n := range names {
		c, err := registrytest.FreeAddr()
		if err != nil {
			t.Fatal(err)
		}
		members = append(members, registry.Member{Name: n, PeerURL: "https://" + pl.Addr(n), ClientURL: "https://" + c})
	}
	files := func(n string) (string, string, string) {
		return filepath.Join(pkiDir, "ca.crt"), filepath.Join(pkiDir, n+".crt"), filepath.Join(pkiDir, n+".key")
	}
	var wg sync.WaitGroup
	errs := make([]error, len(names))
	for i, n := range names {
		wg.Go(func() {
			caf, crt, key := files(n)
			cl, err := registry.OpenClient(context.Background(), registry.Config{
				Mode: registry.ModeEmbedded, Host: n, NoFollow: true, StartMember: member.Start, OpTimeout: time.Second,
				CAFile: caf, CertFile: crt, KeyFile: key,
				Embedded: registry.Embedded{DataDir: filepath.Join(dir, n), Members: members, ListenPeerURL: "https://" + listen[n],
					HeartbeatInterval: 25 * time.Millisecond, ElectionTimeout: 250 * time.Millisecond},
			})
			if err != nil {
				errs[i] = err
				return
			}
			t.Cleanup(func() { _ = cl.Close() })
			select {
			case <-cl.Ready():
			case <-time.After(20 * time.Second):
				errs[i] = fmt.Errorf("%s: not ready after 20 s", n)
			}
		})
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	open := func(ms ...registry.Member) *registry.Client {
		var eps []string
		for _, m := range ms {
			eps = append(eps, m.ClientURL)
		}
		caf, crt, key := files("root")
		cl, err := registry.OpenClient(context.Background(), registry.Config{Mode: registry.ModeEtcd, Host: "root", Endpoints: eps,
			NoFollow: true, OpTimeout: time.Second, CAFile: caf, CertFile: crt, KeyFile: key})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = cl.Close() })
		return cl
	}
	n := 0
	// write enrols a new host through cl (a change that needs the quorum),
	// retrying for up to d while a leader is elected.
	write := func(cl *registry.Client, d time.Duration) error {
		var err error
		for end := time.Now().Add(d); ; {
			n++
			h := fmt.Sprintf("host-%d", n)
			if err = cl.Enroll(t.Context(), registry.Enrolment{Host: h, Identity: registrytest.Identity(h)}); err == nil || time.Now().After(end) {
				return err
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	one, two, three := open(members[0]), open(members[1]), open(members[2])
	for _, cl := range []*registry.Client{one, two, three} {
		if err := write(cl, 10*time.Second); err != nil {
			t.Fatalf("all links up: %v", err)
		}
	}
	for _, state := range []soak.LinkState{soak.LinkDrop, soak.LinkBlackhole} {
		pl.Isolate("member-3", state)
		if err := write(one, 5*time.Second); err != nil {
			t.Fatalf("member-3 cut (%s): member-1 (majority) refused a write: %v", state, err)
		}
		if err := write(two, 5*time.Second); err != nil {
			t.Fatalf("member-3 cut (%s): member-2 (majority) refused a write: %v", state, err)
		}
		if err := write(three, 0); !errors.Is(err, registry.ErrNoQuorum) {
			t.Fatalf("member-3 cut (%s): the minority member's write: %v, want ErrNoQuorum", state, err)
		}
		pl.Isolate("member-2", state)
		for i, cl := range []*registry.Client{one, two, three} {
			if err := write(cl, 0); !errors.Is(err, registry.ErrNoQuorum) {
				t.Fatalf("member-2 and -3 cut (%s): a write through member-%d: %v, want ErrNoQuorum", state, i+1, err)
			}
		}
		pl.Isolate("member-2", soak.LinkUp)
		pl.Isolate("member-3", soak.LinkUp)
		for i, cl := range []*registry.Client{one, two, three} {
			if err := write(cl, 15*time.Second); err != nil {
				t.Fatalf("healed after %s: a write through member-%d: %v", state, i+1, err)
			}
		}
	}
}
