package registry_test

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/migrate/registry/member"
	"github.com/vtpmm/vtpmm/migrate/registry/registrytest"
)

// TestSnapshotRestore: the operator's snapshot restores into a new member
// with users, roles and records as they were, at a revision above every
// one the hosts saw; a VM that moved after the snapshot shows its older
// owner, and the host that holds the newer generation raises the record
// again (the restore rule of docs/registry.md), never the other way.
func TestSnapshotRestore(t *testing.T) {
	c := registrytest.Start(t, registrytest.Options{})
	ctx := t.Context()
	op := c.Open(t, "root")
	if _, err := op.Bootstrap(ctx, registry.BootstrapOptions{Hosts: []string{"host-a", "host-b"}}); err != nil {
		t.Fatal(err)
	}
	registrytest.Enroll(t, op, "host-a", "host-b")
	a, b := c.Open(t, "host-a"), c.Open(t, "host-b")
	if _, err := a.CreateVM(ctx, "vm-1", "host-a"); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Commit(ctx, batch("", "host-a", "host-b", gen("vm-1", 1))); err != nil {
		t.Fatal(err)
	}
	snap := filepath.Join(t.TempDir(), "registry.snap")
	fh, err := os.Create(snap)
	if err != nil {
		t.Fatal(err)
	}
	if err := op.Snapshot(ctx, fh); err != nil {
		t.Fatal(err)
	}
	fh.Close()
	// After the snapshot the VM moves back: host-a holds generation 3.
	if _, err := b.Commit(ctx, batch("", "host-b", "host-a", gen("vm-1", 2))); err != nil {
		t.Fatal(err)
	}
	before, err := a.VMs(ctx, "vm-1")
	if err != nil {
		t.Fatal(err)
	}

	c.StopMember("member-1")
	cfg := c.MemberConfig("member-1", c.Members, "new")
	cfg.Embedded.DataDir = filepath.Join(t.TempDir(), "restored")
	if err := member.Restore(snap, cfg, member.RestoreOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := member.Restore(snap, cfg, member.RestoreOptions{}); !errorsIs(err, registry.ErrExists) {
		t.Fatalf("restore over an existing directory: %v", err)
	}
	m := c.OpenConfig(t, cfg)
	select {
	case <-m.Ready():
	case <-time.After(20 * time.Second):
		t.Fatal("restored member not ready")
	}

	after, err := retryView(t, a, "vm-1")
	if err != nil {
		t.Fatal(err)
	}
	rec := after.VMs["vm-1"]
	if rec.Owner != "host-b" || rec.Generation != 2 {
		t.Fatalf("restored record %+v, want the snapshot's host-b at 2", rec)
	}
	if after.Rev <= before.Rev {
		t.Fatalf("revision went back: %d after %d", after.Rev, before.Rev)
	}
	// The rule: the registry is older (2 < 3): host-a raises it.
	got, err := a.Bump(ctx, registry.Bump{VM: "vm-1", Expect: &rec, Owner: "host-a", Generation: 3})
	if err != nil {
		t.Fatal(err)
	}
	if got.Owner != "host-a" || got.Generation != 3 {
		t.Fatalf("after repair %+v", got)
	}
	// RBAC came back with the snapshot.
	if err := a.SetState(ctx, "host-b", registry.StateFenced); !errorsIs(err, registry.ErrPermission) {
		t.Fatalf("host-a set a state after the restore: %v", err)
	}
}

func retryView(t *testing.T, c *registry.Client, id string) (registry.View, error) {
	var v registry.View
	err := retryNoQuorum(t.Context(), func() (err error) {
		v, err = c.VMs(t.Context(), id)
		return err
	})
	return v, err
}
