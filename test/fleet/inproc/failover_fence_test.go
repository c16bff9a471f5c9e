package inproc_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/test/fleet"
	"github.com/vtpmm/vtpmm/test/fleet/inproc"
)

// The VM stuck behind a per-host fence (make soak failover seeds 3 and
// 2004, docs/failover.md): host-b owns vm-1 and vm-2; host-c holds a
// current replica of vm-1 only. host-b crashes; host-c fences it and
// promotes vm-1. The fence record is per host, so host-b is fenced for
// vm-2's record too. host-b comes back (its lease is live again).
// Before the fix vm-2 ran nowhere: host-b refused its start while the
// fencer was live (rule fenced), and host-c never promoted it (automatic
// failover starts only on a lease loss).

// fencedPair sets up the scenario up to host-b's return: it returns the
// fleet, vm-1 (promoted on host-c), vm-2 (owned by fenced host-b) and
// vm-2's tenant secret.
func fencedPair(t *testing.T) (*inproc.Fleet, fleet.VM, fleet.VM, string) {
	t.Helper()
	ctx := context.Background()
	// Hook mode: a start through the hypervisor asks the start rule
	// (prepare begin), as libvirt's does.
	f := failoverFleet(t, trusted(fleet.HostA, fleet.HostB, fleet.HostC), "auto", func(c *inproc.Config) { c.HookMode = true })
	b, c := f.InProcHost(fleet.HostB), f.InProcHost(fleet.HostC)
	vm1, err := f.CreateVM(ctx, fleet.HostB, "fenced-1")
	if err != nil {
		t.Fatal(err)
	}
	vm2, err := f.CreateVM(ctx, fleet.HostB, "fenced-2")
	if err != nil {
		t.Fatal(err)
	}
	secret2, err := b.TenantReseal(ctx, vm2)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.Admin().Standby(ctx, adminapi.StandbyRequest{VM: vm1.UUID, On: []string{fleet.HostC}}); err != nil {
		t.Fatal(err)
	}
	waitReplicas(t, f, vm1, 1, fleet.HostC)
	if err := b.Crash(ctx); err != nil { // its lease expires after the TTL (2 s)
		t.Fatal(err)
	}
	waitFor(t, "host-c promoted vm-1", 2*time.Minute, func() bool {
		o, g := ownerOf(ctx, f, vm1)
		return o == fleet.HostC && g == 2
	})
	waitFor(t, "vm-1 runs on host-c", time.Minute, func() bool { return c.Running(ctx, vm1) })
	if f.Fenced(fleet.HostB) == 0 {
		t.Fatal("host-c promoted without fencing host-b")
	}
	if o, g := ownerOf(ctx, f, vm2); o != fleet.HostB || g != 1 {
		t.Fatalf("vm-2's record: %s at %d, want host-b at 1", o, g)
	}
	// host-b returns: its lease is live again, and it is fenced for vm-2's
	// record.
	if err := b.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "host-b live again", time.Minute, func() bool {
		v, err := f.Operator().Hosts(ctx, fleet.HostB)
		return err == nil && v.Hosts[fleet.HostB].Live
	})
	return f, vm1, vm2, secret2
}

// checkOneStarter checks that exactly one running vtpmd's start rule admits vm,
// that it is the registry's owner, and that the VM runs there only.
func checkOneStarter(t *testing.T, f *inproc.Fleet, vm fleet.VM) string {
	t.Helper()
	ctx := context.Background()
	owner, _ := ownerOf(ctx, f, vm)
	var admit []string
	for _, n := range f.HostNames() {
		h := f.InProcHost(n)
		if n != owner && h.Running(ctx, vm) {
			t.Fatalf("%s runs on %s, the registry names %s", vm.Name, n, owner)
		}
		if !h.Up() {
			continue // its vtpmd is down: it admits nothing
		}
		if _, err := h.Daemon().Node().CheckStart(ctx, vm.UUID); err == nil {
			admit = append(admit, n)
		}
	}
	if len(admit) != 1 || admit[0] != owner {
		t.Fatalf("%s: the start rule admits it on %v, want exactly the owner %s", vm.Name, admit, owner)
	}
	if !f.InProcHost(owner).Running(ctx, vm) {
		t.Fatalf("%s does not run on its owner %s", vm.Name, owner)
	}
	return owner
}

// TestFencedOwnerTakesBack: host-c holds no replica of vm-2, so host-b
// takes it back (registry Reassert) although host-c, its fencer, is live:
// the cloud's HA manager's start of vm-2 on its registry owner succeeds,
// without an operator. vm-1 stays on host-c.
func TestFencedOwnerTakesBack(t *testing.T) {
	ctx := context.Background()
	f, vm1, vm2, secret2 := fencedPair(t)
	b := f.InProcHost(fleet.HostB)
	// The HA manager starts vm-2 where the registry says (through the
	// prepare hook: the owner's start rule decides).
	var lastErr error
	waitFor(t, "the HA manager's start of vm-2 on its owner succeeds", time.Minute, func() bool {
		owner, _ := ownerOf(ctx, f, vm2)
		if owner == "" {
			return false
		}
		lastErr = f.InProcHost(owner).Fake().StartDomain(ctx, vm2.UUID)
		if lastErr != nil {
			t.Logf("start on %s: %v", owner, lastErr)
		}
		return lastErr == nil
	})
	if o := checkOneStarter(t, f, vm2); o != fleet.HostB {
		t.Fatalf("vm-2 owned by %s, want host-b (host-c holds no replica of it)", o)
	}
	if got, err := b.TenantSecret(ctx, vm2); err != nil || got != secret2 {
		t.Fatalf("vm-2's tenant secret on host-b: %q %v, want %q", got, err, secret2)
	}
	if o := checkOneStarter(t, f, vm1); o != fleet.HostC {
		t.Fatalf("vm-1 owned by %s, want host-c", o)
	}
	log, err := b.Admin().Audit(ctx, vm2.UUID, "registry-raised")
	if err != nil || len(log.Records) == 0 {
		t.Fatalf("host-b's take-back of vm-2 is not audited: %+v %v", log, err)
	}
}

// TestFencerPromotesOnceCurrent is seed 3's shape: host-c's replica of
// vm-2 becomes current only after host-b is back (host-b refreshes it).
// host-c, which fenced host-b for vm-2's record, promotes vm-2 whatever
// host-b's lease says (F10), also after host-c's own vtpmd restarted
// (the loop asks the registry, not its memory). Meanwhile host-b waits
// (rule fenced) rather than take vm-2 back.
func TestFencerPromotesOnceCurrent(t *testing.T) {
	ctx := context.Background()
	f, vm1, vm2, secret2 := fencedPair(t)
	b, c := f.InProcHost(fleet.HostB), f.InProcHost(fleet.HostC)
	// The fencer restarts after writing the fence: nothing it remembers
	// may be needed.
	if err := c.Kill(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Admin().Standby(ctx, adminapi.StandbyRequest{VM: vm2.UUID, On: []string{fleet.HostC}}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "host-c promoted vm-2 and runs it", 2*time.Minute, func() bool {
		o, g := ownerOf(ctx, f, vm2)
		return o == fleet.HostC && g == 2 && c.Running(ctx, vm2)
	})
	if o := checkOneStarter(t, f, vm2); o != fleet.HostC {
		t.Fatalf("vm-2 owned by %s, want host-c", o)
	}
	if got, err := c.TenantSecret(ctx, vm2); err != nil || got != secret2 {
		t.Fatalf("vm-2's tenant secret on host-c: %q %v, want %q", got, err, secret2)
	}
	if _, err := b.Daemon().Node().CheckStart(ctx, vm2.UUID); !errors.Is(err, migrate.ErrNotOwner) {
		t.Fatalf("host-b may start its old copy of vm-2: %v", err)
	}
	if o := checkOneStarter(t, f, vm1); o != fleet.HostC {
		t.Fatalf("vm-1 owned by %s, want host-c", o)
	}
	log, err := c.Admin().Audit(ctx, vm2.UUID, "failover-promoted")
	if err != nil || len(log.Records) != 1 {
		t.Fatalf("audit of vm-2's promotion on host-c: %+v %v", log, err)
	}
}

// TestFailoverFencesAllOrNone (make soak seed 3013): the record of a VM
// whose owner host-a crashed holds an open migration to host-b, which is
// live. host-c, a standby with a current replica, must fence both (F7)
// and cannot fence host-b: it refuses (rule owner-live) before any fence
// agent runs. Before, it powered host-a off first, then refused; the
// source's recovery then found its VM running nowhere and waited forever.
func TestFailoverFencesAllOrNone(t *testing.T) {
	ctx := context.Background()
	f := failoverFleet(t, trusted(fleet.HostA, fleet.HostB, fleet.HostC), "auto")
	a, c := f.InProcHost(fleet.HostA), f.InProcHost(fleet.HostC)
	vm, err := f.CreateVM(ctx, fleet.HostA, "fence-all")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Admin().Standby(ctx, adminapi.StandbyRequest{VM: vm.UUID, On: []string{fleet.HostC}}); err != nil {
		t.Fatal(err)
	}
	waitReplicas(t, f, vm, 1, fleet.HostC)
	if err := a.Crash(ctx); err != nil {
		t.Fatal(err)
	}
	// The intent host-a's migration to host-b had written (host-a's
	// vtpmd is gone, so nothing aborts it).
	// The operator's client may reach host-a's member while it stops (a
	// crash hard-stops it: "server stopped"); an operator retries.
	batch := registry.Batch{TxID: "0123456789abcdef0123456789abcdef", From: fleet.HostA, To: fleet.HostB,
		VMs: []registry.VMGen{{ID: vm.UUID, Generation: 1}}}
	var berr error
	for end := time.Now().Add(30 * time.Second); time.Now().Before(end); time.Sleep(200 * time.Millisecond) {
		if _, berr = f.Operator().Begin(ctx, batch); !errors.Is(berr, registry.ErrNoQuorum) {
			break
		}
	}
	if berr != nil {
		t.Fatal(berr)
	}
	waitNotLive(t, f, fleet.HostA)
	waitFor(t, "host-c tried and refused the failover", time.Minute, func() bool {
		l, err := c.Admin().Audit(ctx, vm.UUID, "failover-refused")
		return err == nil && len(l.Records) >= 2
	})
	if n := f.Fenced(fleet.HostA); n != 0 {
		t.Fatalf("host-a was fenced %d times although host-b, the open migration's destination, is live: nothing may be fenced", n)
	}
	if o, g := ownerOf(ctx, f, vm); o != fleet.HostA || g != 1 {
		t.Fatalf("record %s at %d, want host-a at 1", o, g)
	}
}

// TestFailoverStartRetried (make soak seed 3022): the promotion wins its
// CAS but the VM's start fails (here the hypervisor refuses the secret;
// in the soak the promoted host's registry link was cut, so the secret's
// define refused: self-fence). The failover loop retries the start while
// this host owns the VM, and the VM runs with its tenant's secret. Before,
// the VM stayed promoted and defined nowhere.
func TestFailoverStartRetried(t *testing.T) {
	ctx := context.Background()
	f := failoverFleet(t, trusted(fleet.HostA, fleet.HostB, fleet.HostC), "auto")
	a, b := f.InProcHost(fleet.HostA), f.InProcHost(fleet.HostB)
	vm, err := f.CreateVM(ctx, fleet.HostA, "start-retry")
	if err != nil {
		t.Fatal(err)
	}
	secret, err := a.TenantReseal(ctx, vm)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Admin().Standby(ctx, adminapi.StandbyRequest{VM: vm.UUID, On: []string{fleet.HostB}}); err != nil {
		t.Fatal(err)
	}
	waitReplicas(t, f, vm, 1, fleet.HostB)
	waitFor(t, "host-b's replica holds the tenant's last secret", time.Minute, func() bool {
		r := replicaOf(b.Daemon(), vm)
		return r != nil && string(r.Request.State) == string(readState(t, a, vm))
	})
	b.Fake().FailDefineSecret = errors.New("injected: secret refused")
	if err := a.Crash(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "host-b promoted", 2*time.Minute, func() bool {
		o, g := ownerOf(ctx, f, vm)
		return o == fleet.HostB && g == 2
	})
	time.Sleep(2 * time.Second) // a few failover passes with the start failing
	if b.Running(ctx, vm) {
		t.Fatal("the VM runs on host-b although its secret was refused")
	}
	b.Fake().FailDefineSecret = nil
	waitFor(t, "the promoted VM runs on host-b after a retry", time.Minute, func() bool { return b.Running(ctx, vm) })
	if got, err := b.TenantSecret(ctx, vm); err != nil || got != secret {
		t.Fatalf("tenant secret on host-b: %q %v, want %q", got, err, secret)
	}
	checkOneStarter(t, f, vm)
}
