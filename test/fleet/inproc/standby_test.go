package inproc_test

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/test/fleet"
)

// TestStandbyReplica (issue 15 item 1): host-a owns a VM with standbys
// host-b and host-c (tampered). host-b gets a replica at generation 1 and
// cannot start from it (rule standby-replica); host-c fails attestation,
// is dropped and never holds a replica. When the tenant seals a new
// secret the replica is refreshed, at 0 host TPM commands on the owner.
func TestStandbyReplica(t *testing.T) {
	ctx := context.Background()
	f := failoverFleet(t, nil, "manual")
	a, b, c := f.InProcHost(fleet.HostA), f.InProcHost(fleet.HostB), f.InProcHost(fleet.HostC)
	vm, err := f.CreateVM(ctx, fleet.HostA, "standby-1")
	if err != nil {
		t.Fatal(err)
	}
	set, err := b.Admin().Standby(ctx, adminapi.StandbyRequest{VM: vm.UUID, On: []string{fleet.HostB, fleet.HostC}})
	if err != nil || set.Owner != fleet.HostA {
		t.Fatalf("vm standby: %+v %v", set, err)
	}
	waitFor(t, "host-b's replica at generation 1", time.Minute, func() bool { return standbyGen(ctx, f, vm, fleet.HostB) == 1 })
	waitFor(t, "host-c dropped after its attestation was refused", time.Minute, func() bool { return standbyGen(ctx, f, vm, fleet.HostC) == -1 })
	if r := replicaOf(c.Daemon(), vm); r != nil {
		t.Fatalf("host-c (tampered) holds a replica: %+v", r.Request.Generation)
	}
	r := replicaOf(b.Daemon(), vm)
	if r == nil || r.Request.Generation != 1 || r.Request.Owner != fleet.HostA {
		t.Fatalf("host-b's replica: %+v", r)
	}
	fi, err := os.Stat(filepath.Join(b.Config().DataDir, "replicas", vm.UUID+".replica"))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("replica file: %v %v", fi, err)
	}
	// Unusable on the standby: the start rule refuses, naming the rule.
	if _, err := b.Daemon().Node().CheckStart(ctx, vm.UUID); !errors.Is(err, migrate.ErrNotOwner) || !strings.Contains(err.Error(), "rule "+migrate.RuleStandbyReplica) {
		t.Fatalf("start from the replica on host-b: %v", err)
	}
	if _, err := b.Admin().HookPrepare(ctx, adminapi.HookRequest{UUID: vm.UUID, Name: vm.Name}); err == nil {
		t.Fatal("host-b's start gate admitted a start from its replica")
	}
	info, err := a.Admin().VM(ctx, vm.UUID)
	if err != nil || len(info.Standbys) != 1 || info.Standbys[0].Host != fleet.HostB || !info.Standbys[0].Current {
		t.Fatalf("vm show on host-a: %+v %v", info.Standbys, err)
	}
	// Refresh: the state changes, the replica follows; the owner's host
	// TPM is not used (host-b's evidence is fresh).
	before := r.Request.StateSHA256
	tpm0 := a.Daemon().Host().Meter().Stats().Total
	if _, err := a.TenantReseal(ctx, vm); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the replica refreshed after the state changed", time.Minute, func() bool {
		r := replicaOf(b.Daemon(), vm)
		return r != nil && string(r.Request.StateSHA256) != string(before)
	})
	tpm := a.Daemon().Host().Meter().Stats().Total - tpm0
	rr := replicaOf(b.Daemon(), vm)
	wireBytes, _ := json.Marshal(&rr.Request)
	t.Logf("refresh: %d bytes of state, %d bytes on the wire (JSON), %d host TPM commands on the owner", len(rr.Request.State), len(wireBytes), tpm)
	if tpm != 0 {
		t.Fatalf("a refresh cost the owner %d host TPM commands, want 0", tpm)
	}
	// --off: the standby drops its replica.
	if _, err := a.Admin().Standby(ctx, adminapi.StandbyRequest{VM: vm.UUID, Off: []string{fleet.HostB}}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "host-b dropped its replica after --off", time.Minute, func() bool { return replicaOf(b.Daemon(), vm) == nil })
}

// TestStandbyAfterMigration: the owner migrates a VM to one of its
// standbys. The new owner drops its replica and standby record (an owner
// is no standby of its own VM) and refreshes the other standby at the new
// generation; the replicas follow the migration.
func TestStandbyAfterMigration(t *testing.T) {
	ctx := context.Background()
	f := failoverFleet(t, trusted(fleet.HostA, fleet.HostB, fleet.HostC), "manual")
	a, b, c := f.InProcHost(fleet.HostA), f.InProcHost(fleet.HostB), f.InProcHost(fleet.HostC)
	vm, err := f.CreateVM(ctx, fleet.HostA, "moving-1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Admin().Standby(ctx, adminapi.StandbyRequest{VM: vm.UUID, On: []string{fleet.HostB, fleet.HostC}}); err != nil {
		t.Fatal(err)
	}
	waitReplicas(t, f, vm, 1, fleet.HostB, fleet.HostC)
	if _, err := a.Daemon().Node().Migrate(ctx, migrate.Request{VMs: []string{vm.UUID}, Dest: fleet.HostB}, nil); err != nil {
		t.Fatal(err)
	}
	waitReplicas(t, f, vm, 2, fleet.HostC)
	if r := replicaOf(c.Daemon(), vm); r.Request.Owner != fleet.HostB {
		t.Fatalf("host-c's replica is from %s", r.Request.Owner)
	}
	waitFor(t, "host-b, the owner now, holds no replica and no standby record", time.Minute, func() bool {
		return replicaOf(b.Daemon(), vm) == nil && standbyGen(ctx, f, vm, fleet.HostB) == -1
	})
}
