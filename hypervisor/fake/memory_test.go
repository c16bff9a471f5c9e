package fake_test

import (
	"context"
	"errors"
	"testing"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/hypervisor/fake"
)

// TestMemoryAndMigrationBytes: the fake reports a destination's free memory
// (its default, what SetFreeMemory gave it; an unknown host is unreachable),
// a VM's memory (a VM defined here only), and an outgoing migration's
// bytes while it runs (its memory and vTPM state, all processed once the
// state is across; nothing before or after the job).
func TestMemoryAndMigrationBytes(t *testing.T) {
	t.Parallel()
	ctx := ctxT(t)
	_, hs := newHosts(t, "src", "dst")
	src, dst := hs[0], hs[1]
	if free, err := src.FreeMemory(ctx, dst.Target()); err != nil || free != fake.DefaultFreeMemory {
		t.Fatalf("default free memory of dst: %d, %v", free, err)
	}
	dst.SetFreeMemory(3 << 30)
	if free, err := src.FreeMemory(ctx, dst.Target()); err != nil || free != 3<<30 {
		t.Fatalf("free memory of dst after SetFreeMemory: %d, %v", free, err)
	}
	if _, err := src.FreeMemory(ctx, hypervisor.Target{Name: "nowhere"}); !errors.Is(err, hypervisor.ErrUnreachable) {
		t.Fatalf("free memory of an unknown host: %v, want ErrUnreachable", err)
	}
	v := newVM(t, src)
	if m, err := src.DomainMemory(ctx, v.uuid); err != nil || m != fake.DefaultVMMemory {
		t.Fatalf("memory of the VM: %d, %v", m, err)
	}
	if _, err := dst.DomainMemory(ctx, v.uuid); !errors.Is(err, hypervisor.ErrNoDomain) {
		t.Fatalf("memory of a VM not defined on dst: %v, want ErrNoDomain", err)
	}
	if _, _, active, err := src.MigrationBytes(ctx, v.uuid); err != nil || active {
		t.Fatalf("bytes without a migration: active=%v %v", active, err)
	}
	if err := dst.DefineSecret(ctx, v.uuid, v.key); err != nil {
		t.Fatal(err)
	}
	var done, total uint64
	var active bool
	src.BeforeMigrateCommit = func() error {
		var err error
		done, total, active, err = src.MigrationBytes(context.Background(), v.uuid)
		return err
	}
	if err := src.Migrate(ctx, v.uuid, dst.Target()); err != nil {
		t.Fatal(err)
	}
	if !active || total <= fake.DefaultVMMemory || done != total {
		t.Fatalf("bytes during the migration: %d of %d, active=%v; want all of the VM's memory and its state", done, total, active)
	}
	if _, _, active, err := src.MigrationBytes(ctx, v.uuid); err != nil || active {
		t.Fatalf("bytes after the migration: active=%v %v", active, err)
	}
}
