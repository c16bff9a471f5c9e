package inproc_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/cmd/vtpmd/daemon"
	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/test/fleet"
	"github.com/vtpmm/vtpmm/test/fleet/inproc"
)

// failoverFleet starts a fleet whose hosts refresh replicas every 1 s
// (max_lag 3 s) with a 2 s registry lease; mode is standby.failover;
// opts change the fleet's configuration further.
func failoverFleet(t *testing.T, hosts []inproc.HostSpec, mode string, opts ...func(*inproc.Config)) *inproc.Fleet {
	t.Helper()
	ctx := context.Background()
	cfg := inproc.Config{Hosts: hosts, RegistryTTL: 2 * time.Second, FenceAgent: true,
		Configure: func(_ string, c *daemon.Config) {
			c.Standby = daemon.StandbyConfig{MaxLag: "3s", Failover: mode}
		}}
	for _, o := range opts {
		o(&cfg)
	}
	f, err := inproc.New(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = f.Close(context.Background()) })
	return f
}

func trusted(names ...string) []inproc.HostSpec {
	var out []inproc.HostSpec
	for _, n := range names {
		out = append(out, inproc.HostSpec{Name: n})
	}
	return out
}

// waitFor polls cond every 100 ms until it holds or the guard (a bound on
// a hung test, not a timing assertion) runs out.
func waitFor(t *testing.T, what string, guard time.Duration, cond func() bool) {
	t.Helper()
	end := time.Now().Add(guard)
	for !cond() {
		if time.Now().After(end) {
			t.Fatalf("%s: not within %v", what, guard)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// standbyGen is the generation of host's standby record of vm (-1: none).
func standbyGen(ctx context.Context, f *inproc.Fleet, vm fleet.VM, host string) int64 {
	sbs, err := f.Operator().Standbys(ctx, vm.UUID)
	if err != nil {
		return -1
	}
	for _, s := range sbs {
		if s.Host == host {
			return int64(s.Generation)
		}
	}
	return -1
}

func replicaOf(d *daemon.Daemon, vm fleet.VM) *migrate.StoredReplica {
	if d == nil {
		return nil
	}
	rs, _ := d.Node().Replicas()
	for _, r := range rs {
		if r.Request.VM == vm.UUID {
			return r
		}
	}
	return nil
}

// winner returns the host that owns vm in the registry (and its record).
func ownerOf(ctx context.Context, f *inproc.Fleet, vm fleet.VM) (string, uint64) {
	v, err := f.Operator().VMs(ctx, vm.UUID)
	if err != nil {
		return "", 0
	}
	rec := v.VMs[vm.UUID]
	return rec.Owner, rec.Generation
}

// TestFailoverKill (issue 15 items 2 and 3): host-a owns a VM whose
// tenant sealed a secret, with standbys host-b and host-c. host-a's vtpmd
// is killed (the VM keeps running there until the fence). After its lease
// expires, both standbys fence it and race with one CAS: exactly one
// promotes at generation 2, starts the VM, and the tenant's last secret
// unseals there. The loser becomes a standby of the winner at generation
// 2. host-a, restarted, refuses its old copy and shreds it.
func TestFailoverKill(t *testing.T) {
	ctx := context.Background()
	f := failoverFleet(t, trusted(fleet.HostA, fleet.HostB, fleet.HostC), "auto")
	a := f.InProcHost(fleet.HostA)
	vm, err := f.CreateVM(ctx, fleet.HostA, "failover-1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Admin().Standby(ctx, adminapi.StandbyRequest{VM: vm.UUID, On: []string{fleet.HostB, fleet.HostC}}); err != nil {
		t.Fatal(err)
	}
	secret, err := a.TenantReseal(ctx, vm)
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "both replicas current", time.Minute, func() bool {
		for _, h := range []string{fleet.HostB, fleet.HostC} {
			r := replicaOf(f.InProcHost(h).Daemon(), vm)
			if r == nil || standbyGen(ctx, f, vm, h) != 1 {
				return false
			}
			st, err := os.ReadFile(filepath.Join(a.Daemon().Host().Layout().VMState(vm.UUID), "tpm2-00.permall"))
			if dir, derr := a.Fake().VTPMStateDir(ctx, vm.UUID); derr == nil {
				st, err = os.ReadFile(filepath.Join(dir, "tpm2-00.permall"))
			}
			if err != nil || string(r.Request.State) != string(st) {
				return false
			}
		}
		return true
	})
	t0 := time.Now()
	if err := a.Crash(ctx); err != nil { // its lease expires after the TTL (2 s)
		t.Fatal(err)
	}
	var owner string
	var gen uint64
	waitFor(t, "a standby promoted", 2*time.Minute, func() bool {
		owner, gen = ownerOf(ctx, f, vm)
		return owner != fleet.HostA && gen == 2
	})
	promoted := time.Since(t0)
	w := f.InProcHost(owner)
	waitFor(t, "the VM runs on the new owner", time.Minute, func() bool { return w.Running(ctx, vm) })
	running := time.Since(t0)
	got, err := w.TenantSecret(ctx, vm)
	if err != nil || got != secret {
		t.Fatalf("tenant secret on %s: %q %v, want %q", owner, got, err, secret)
	}
	rep := w.Daemon().LastFailover()
	t.Logf("owner crashed -> %s promoted at generation 2 after %v, VM running after %v; fence agent ran %d times for host-a",
		owner, promoted.Round(time.Millisecond), running.Round(time.Millisecond), f.Fenced(fleet.HostA))
	t.Logf("failover time split: lease expiry and detection %v, fencing %v, promotion %v, start %v (vtpmm's share: promotion + start %v)",
		rep.Began.Sub(t0).Round(time.Millisecond), rep.Fence.Round(time.Millisecond), rep.Promote.Round(time.Millisecond),
		rep.Start.Round(time.Millisecond), (rep.Promote + rep.Start).Round(time.Millisecond))
	if f.Fenced(fleet.HostA) == 0 {
		t.Fatal("promoted without running the fence agent")
	}
	// Exactly one: the other standby holds no key and becomes a standby
	// of the new owner at generation 2.
	loser := fleet.HostB
	if owner == fleet.HostB {
		loser = fleet.HostC
	}
	l := f.InProcHost(loser)
	if _, err := l.Daemon().Node().CheckStart(ctx, vm.UUID); err == nil {
		t.Fatalf("the loser %s can start the VM too", loser)
	}
	if l.Running(ctx, vm) || a.Running(ctx, vm) {
		t.Fatal("the VM runs on two hosts")
	}
	waitFor(t, "the loser refreshed by the new owner at generation 2", time.Minute, func() bool {
		r := replicaOf(l.Daemon(), vm)
		return r != nil && r.Request.Generation == 2 && r.Request.Owner == owner
	})
	log, err := w.Admin().Audit(ctx, vm.UUID, "failover-promoted")
	if err != nil || len(log.Records) != 1 {
		t.Fatalf("audit of the promotion on %s: %+v %v", owner, log, err)
	}
	// The old owner returns: it refuses its old copy and shreds it once
	// the new owner confirms.
	if err := a.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Daemon().Node().CheckStart(ctx, vm.UUID); !errors.Is(err, migrate.ErrNotOwner) {
		t.Fatalf("host-a restarted may start its old copy: %v", err)
	}
	waitFor(t, "host-a shredded its stale copy", 2*time.Minute, func() bool {
		l, err := a.Admin().Audit(ctx, vm.UUID, "stale-copy-shredded")
		return err == nil && len(l.Records) == 1
	})
}

// waitReplicas waits until each host holds a replica of vm at gen whose
// standby record shows it.
func waitReplicas(t *testing.T, f *inproc.Fleet, vm fleet.VM, gen uint64, hosts ...string) {
	t.Helper()
	ctx := context.Background()
	waitFor(t, "replicas at generation "+string(rune('0'+gen)), time.Minute, func() bool {
		for _, h := range hosts {
			r := replicaOf(f.InProcHost(h).Daemon(), vm)
			if r == nil || r.Request.Generation != gen || standbyGen(ctx, f, vm, h) != int64(gen) {
				return false
			}
		}
		return true
	})
}

// waitNotLive waits until the registry shows host's lease gone.
func waitNotLive(t *testing.T, f *inproc.Fleet, host string) {
	t.Helper()
	waitFor(t, host+"'s lease gone", time.Minute, func() bool {
		v, err := f.Operator().Hosts(context.Background(), host)
		return err == nil && !v.Hosts[host].Live
	})
}

// TestFailoverRace: two standbys promote at once with the operator's
// confirmation that the owner is fenced: exactly one wins (one CAS), the
// VM runs there only. Before the owner's lease is gone, an unconfirmed
// failover is refused (rule owner-live).
func TestFailoverRace(t *testing.T) {
	ctx := context.Background()
	f := failoverFleet(t, trusted(fleet.HostA, fleet.HostB, fleet.HostC), "manual")
	a, b, c := f.InProcHost(fleet.HostA), f.InProcHost(fleet.HostB), f.InProcHost(fleet.HostC)
	vm, err := f.CreateVM(ctx, fleet.HostA, "race-1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Admin().Standby(ctx, adminapi.StandbyRequest{VM: vm.UUID, On: []string{fleet.HostB, fleet.HostC}}); err != nil {
		t.Fatal(err)
	}
	waitReplicas(t, f, vm, 1, fleet.HostB, fleet.HostC)
	if _, err := b.Admin().Failover(ctx, adminapi.FailoverRequest{VM: vm.UUID, To: fleet.HostB}); err == nil || !strings.Contains(err.Error(), "rule "+migrate.RuleOwnerLive) {
		t.Fatalf("failover from a live owner: %v, want a refusal naming rule %s", err, migrate.RuleOwnerLive)
	}
	if err := a.Crash(ctx); err != nil {
		t.Fatal(err)
	}
	if err := f.Fence(ctx, fleet.HostA); err != nil { // the operator powers host-a off
		t.Fatal(err)
	}
	type result struct {
		host string
		rep  adminapi.FailoverReport
		err  error
	}
	results := make(chan result, 2)
	for _, h := range []*inproc.Host{b, c} {
		go func() {
			rep, err := h.Admin().Failover(ctx, adminapi.FailoverRequest{VM: vm.UUID, To: h.Name(), ConfirmFenced: []string{fleet.HostA}})
			results <- result{h.Name(), rep, err}
		}()
	}
	// The registry says who won. The winner's own call may still fail
	// after its promotion: host-a's member was hard-stopped, and under load
	// the election can outlast the winner's 2 s lease, so it self-fences
	// the secret's define and leaves the start to its failover loop
	// (TestFailoverStartRetried; CI run of 76134bd).
	byHost := map[string]result{}
	for range 2 {
		r := <-results
		byHost[r.host] = r
	}
	owner, gen := ownerOf(ctx, f, vm)
	if gen != 2 || (owner != fleet.HostB && owner != fleet.HostC) {
		t.Fatalf("after the race the registry shows %s at generation %d; want host-b or host-c at 2 (b: %v; c: %v)", owner, gen, byHost[fleet.HostB].err, byHost[fleet.HostC].err)
	}
	for h, r := range byHost {
		switch {
		case h != owner && r.err == nil:
			t.Fatalf("%s's failover succeeded too, but the registry shows %s the owner: %+v", h, owner, r.rep)
		case h != owner:
			t.Logf("loser %s: %v", h, r.err)
		case r.err != nil:
			t.Logf("winner %s promoted; its start is left to the failover loop: %v", h, r.err)
		case r.rep.Generation != 2 || !r.rep.Started:
			t.Fatalf("winner %s's report: %+v", h, r.rep)
		default:
			t.Logf("%s won the race: fence %v, promote %v, start %v", h, r.rep.Fence, r.rep.Promote, r.rep.Start)
		}
	}
	winner := f.InProcHost(owner)
	waitFor(t, "the VM runs on the winner", time.Minute, func() bool { return winner.Running(ctx, vm) })
	running := 0
	for _, h := range []*inproc.Host{a, b, c} {
		if h.Running(ctx, vm) {
			running++
		}
	}
	if running != 1 {
		t.Fatalf("the VM runs on %d hosts", running)
	}
}

// TestFailoverNoQuorum: the owner and a second registry member die: the
// standby sees no quorum, fences nothing and never promotes (fail closed);
// an operator's failover fails too (registry unavailable). When quorum
// returns, it promotes, once.
func TestFailoverNoQuorum(t *testing.T) {
	ctx := context.Background()
	f := failoverFleet(t, trusted(fleet.HostA, fleet.HostB, fleet.HostC), "auto")
	a, b, c := f.InProcHost(fleet.HostA), f.InProcHost(fleet.HostB), f.InProcHost(fleet.HostC)
	vm, err := f.CreateVM(ctx, fleet.HostA, "quorum-1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Admin().Standby(ctx, adminapi.StandbyRequest{VM: vm.UUID, On: []string{fleet.HostB}}); err != nil {
		t.Fatal(err)
	}
	waitReplicas(t, f, vm, 1, fleet.HostB)
	if err := c.Crash(ctx); err != nil {
		t.Fatal(err)
	}
	if err := a.Crash(ctx); err != nil {
		t.Fatal(err)
	}
	// Three lease TTLs without quorum: host-b never holds the VM's key.
	end := time.Now().Add(6 * time.Second)
	for time.Now().Before(end) {
		if infos, _ := b.Daemon().Host().Keys().List(ctx); len(infos) != 0 {
			t.Fatalf("host-b promoted without quorum: %+v", infos)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if _, err := b.Admin().Failover(ctx, adminapi.FailoverRequest{VM: vm.UUID, To: fleet.HostB, ConfirmFenced: []string{fleet.HostA}}); err == nil {
		t.Fatal("an operator's failover went through without quorum")
	}
	if n := f.Fenced(fleet.HostA); n != 0 {
		t.Fatalf("host-a fenced %d times without quorum", n)
	}
	if infos, _ := b.Daemon().Host().Keys().List(ctx); len(infos) != 0 {
		t.Fatalf("host-b holds a key after the refused failover: %+v", infos)
	}
	if err := c.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "host-b promoted once quorum returned", 2*time.Minute, func() bool {
		owner, gen := ownerOf(ctx, f, vm)
		return owner == fleet.HostB && gen == 2 && b.Running(ctx, vm)
	})
	if c.Running(ctx, vm) || a.Running(ctx, vm) {
		t.Fatal("the VM runs on two hosts")
	}
}

// TestFailoverCrashAfterTakeOver: the promoting standby dies right after
// its CAS won (its key still PENDING). Restarted, its recovery commits
// the promotion from the registry (the ledger's transaction), drops the
// replica, and the VM starts there with the tenant's secret.
func TestFailoverCrashAfterTakeOver(t *testing.T) {
	ctx := context.Background()
	f := failoverFleet(t, trusted(fleet.HostA, fleet.HostB, fleet.HostC), "manual")
	a, b := f.InProcHost(fleet.HostA), f.InProcHost(fleet.HostB)
	vm, err := f.CreateVM(ctx, fleet.HostA, "crash-1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.Admin().Standby(ctx, adminapi.StandbyRequest{VM: vm.UUID, On: []string{fleet.HostB}}); err != nil {
		t.Fatal(err)
	}
	secret, err := a.TenantReseal(ctx, vm)
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the replica of the new state", time.Minute, func() bool {
		r := replicaOf(b.Daemon(), vm)
		return r != nil && string(r.Request.State) == string(readState(t, a, vm))
	})
	if err := a.Crash(ctx); err != nil {
		t.Fatal(err)
	}
	if err := f.Fence(ctx, fleet.HostA); err != nil {
		t.Fatal(err)
	}
	b.OnCrashPoint(migrate.CrashAt(migrate.FailoverAfterTakeOver))
	if _, err := b.Admin().Failover(ctx, adminapi.FailoverRequest{VM: vm.UUID, To: fleet.HostB, ConfirmFenced: []string{fleet.HostA}}); err == nil {
		t.Fatal("the failover did not reach its crash point")
	}
	if owner, gen := ownerOf(ctx, f, vm); owner != fleet.HostB || gen != 2 {
		t.Fatalf("registry after the CAS: %s/%d", owner, gen)
	}
	if err := b.Kill(ctx); err != nil {
		t.Fatal(err)
	}
	b.OnCrashPoint(nil)
	if err := b.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "host-b's recovery committed the promotion", time.Minute, func() bool {
		_, err := b.Daemon().Node().CheckStart(ctx, vm.UUID)
		return err == nil && replicaOf(b.Daemon(), vm) == nil
	})
	if _, err := b.Daemon().Node().DefineSecret(ctx, vm.UUID); err != nil {
		t.Fatal(err)
	}
	if err := b.Fake().DefineVTPMDomain(ctx, hypervisor.Domain{UUID: vm.UUID, Name: vm.Name}, b.Daemon().Host().Layout().VMState(vm.UUID)); err != nil {
		t.Fatal(err)
	}
	if err := b.Fake().StartDomain(ctx, vm.UUID); err != nil {
		t.Fatal(err)
	}
	if got, err := b.TenantSecret(ctx, vm); err != nil || got != secret {
		t.Fatalf("tenant secret after the resumed promotion: %q %v, want %q", got, err, secret)
	}
}

// TestSelfFence (issue 15 item 3): an owner cut off the registry, its
// lease gone, hands out none of its VMs' keys: no secret define for a
// start (the hook's prepare begin), no migration as the source, no
// replica (rule self-fence). The VM it runs keeps running: only a fence
// stops it.
func TestSelfFence(t *testing.T) {
	ctx := context.Background()
	f := failoverFleet(t, trusted(fleet.HostA, fleet.HostB, fleet.HostC), "manual")
	a := f.InProcHost(fleet.HostA)
	vm, err := f.CreateVM(ctx, fleet.HostA, "selffence-1")
	if err != nil {
		t.Fatal(err)
	}
	if err := a.CutRegistry(); err != nil {
		t.Fatal(err)
	}
	rule := "rule " + migrate.RuleSelfFence
	if _, err := a.Admin().HookPrepare(ctx, adminapi.HookRequest{UUID: vm.UUID, Name: vm.Name}); err == nil || !strings.Contains(err.Error(), rule) {
		t.Fatalf("secret define on a self-fenced owner: %v, want %s", err, rule)
	}
	if _, err := a.Daemon().Node().Migrate(ctx, migrate.Request{VMs: []string{vm.UUID}, Dest: fleet.HostB}, nil); err == nil || !strings.Contains(err.Error(), rule) {
		t.Fatalf("migration from a self-fenced owner: %v, want %s", err, rule)
	}
	if _, err := a.Daemon().Node().SendReplica(ctx, vm.UUID, vm.Name, fleet.HostB, []byte("state")); err == nil || !strings.Contains(err.Error(), rule) {
		t.Fatalf("replica from a self-fenced owner: %v, want %s", err, rule)
	}
	if !a.Running(ctx, vm) {
		t.Fatal("self-fencing stopped the running VM; only a fence does")
	}
}

// TestSourceFencesGoneDestination (model finding F12): host-a's vtpmd
// dies after host-b holds the key PENDING and before the hypervisor is
// asked (the intent open in the registry); host-a then loses power (its VM
// stops, its domain and vTPM state stay) and host-b dies for good.
// host-a, restarted, cannot reach host-b; once host-b's lease is gone, its
// recovery fences host-b and aborts: host-a owns the VM at its generation
// again, starts it, and the tenant's secret unseals.
func TestSourceFencesGoneDestination(t *testing.T) {
	ctx := context.Background()
	f := failoverFleet(t, trusted(fleet.HostA, fleet.HostB, fleet.HostC), "manual")
	a, b := f.InProcHost(fleet.HostA), f.InProcHost(fleet.HostB)
	vm, err := f.CreateVM(ctx, fleet.HostA, "f12-1")
	if err != nil {
		t.Fatal(err)
	}
	secret, err := a.TenantReseal(ctx, vm)
	if err != nil {
		t.Fatal(err)
	}
	a.OnCrashPoint(migrate.CrashAt(migrate.SrcAfterPrepared))
	if _, err := a.Daemon().Node().Migrate(ctx, migrate.Request{VMs: []string{vm.UUID}, Dest: fleet.HostB}, nil); !errors.Is(err, migrate.ErrCrash) {
		t.Fatalf("migration: %v, want the injected crash", err)
	}
	if err := a.Kill(ctx); err != nil {
		t.Fatal(err)
	}
	a.OnCrashPoint(nil)
	if err := a.Fake().DestroyDomain(ctx, vm.UUID); err != nil { // host-a's power loss
		t.Fatal(err)
	}
	if err := b.Crash(ctx); err != nil { // gone for good
		t.Fatal(err)
	}
	if err := a.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "host-a's recovery fenced host-b and aborted", 2*time.Minute, func() bool {
		owner, gen := ownerOf(ctx, f, vm)
		v, _ := f.Operator().VMs(ctx, vm.UUID)
		_, err := a.Daemon().Node().CheckStart(ctx, vm.UUID)
		return owner == fleet.HostA && gen == 1 && v.VMs[vm.UUID].Tx == nil && err == nil
	})
	if f.Fenced(fleet.HostB) == 0 || b.Running(ctx, vm) {
		t.Fatalf("host-b fenced %d times, VM running there: %v", f.Fenced(fleet.HostB), b.Running(ctx, vm))
	}
	log, err := a.Admin().Audit(ctx, vm.UUID, "host-fenced")
	if err != nil || len(log.Records) != 1 {
		t.Fatalf("audit of the fence on host-a: %+v %v", log, err)
	}
	if _, err := a.Daemon().Node().DefineSecret(ctx, vm.UUID); err != nil {
		t.Fatal(err)
	}
	if err := a.Fake().StartDomain(ctx, vm.UUID); err != nil {
		t.Fatal(err)
	}
	if got, err := a.TenantSecret(ctx, vm); err != nil || got != secret {
		t.Fatalf("tenant secret on host-a after F12: %q %v, want %q", got, err, secret)
	}
}

// TestSourceWaitsForDestinationWithTheVM (soak seed 4001): host-a's vtpmd
// dies right after the hypervisor moved its VM to host-b (its domain and
// vTPM state left host-a), then host-b loses power. host-a's recovery
// cannot reach host-b and must not abort (F12 would leave it a key with
// no domain and no state): it waits, and fences nothing. Once host-b is
// back, the transaction commits there; host-b starts the VM and the
// tenant's secret unseals. Before the fix host-a fenced host-b, aborted,
// and no host could start the VM.
func TestSourceWaitsForDestinationWithTheVM(t *testing.T) {
	ctx := context.Background()
	f := failoverFleet(t, trusted(fleet.HostA, fleet.HostB, fleet.HostC), "manual")
	a, b := f.InProcHost(fleet.HostA), f.InProcHost(fleet.HostB)
	vm, err := f.CreateVM(ctx, fleet.HostA, "f12-2")
	if err != nil {
		t.Fatal(err)
	}
	secret, err := a.TenantReseal(ctx, vm)
	if err != nil {
		t.Fatal(err)
	}
	a.OnCrashPoint(migrate.CrashAt(migrate.SrcAfterHypervisor))
	if _, err := a.Daemon().Node().Migrate(ctx, migrate.Request{VMs: []string{vm.UUID}, Dest: fleet.HostB}, nil); !errors.Is(err, migrate.ErrCrash) {
		t.Fatalf("migration: %v, want the injected crash", err)
	}
	if !b.Running(ctx, vm) {
		t.Fatal("the VM does not run on host-b after the hypervisor's migration")
	}
	if err := a.Kill(ctx); err != nil {
		t.Fatal(err)
	}
	a.OnCrashPoint(nil)
	if err := b.Crash(ctx); err != nil {
		t.Fatal(err)
	}
	if err := b.Fake().DestroyDomain(ctx, vm.UUID); err != nil { // host-b's power loss
		t.Fatal(err)
	}
	if err := a.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	// host-b's lease expires (TTL 2 s) and host-a's recovery runs several
	// times meanwhile: it must neither fence nor abort.
	end := time.Now().Add(8 * time.Second)
	for time.Now().Before(end) {
		if n := f.Fenced(fleet.HostB); n != 0 {
			t.Fatalf("host-a fenced host-b (%d times), which holds the VM's domain and state", n)
		}
		if _, err := a.Daemon().Node().CheckStart(ctx, vm.UUID); err == nil {
			t.Fatal("host-a may start the VM that left it")
		}
		time.Sleep(250 * time.Millisecond)
	}
	if err := b.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the transaction committed to host-b", 2*time.Minute, func() bool {
		owner, gen := ownerOf(ctx, f, vm)
		_, err := b.Daemon().Node().CheckStart(ctx, vm.UUID)
		return owner == fleet.HostB && gen == 2 && err == nil
	})
	if _, err := b.Daemon().Node().DefineSecret(ctx, vm.UUID); err != nil {
		t.Fatal(err)
	}
	if err := b.Fake().StartDomain(ctx, vm.UUID); err != nil {
		t.Fatal(err)
	}
	if got, err := b.TenantSecret(ctx, vm); err != nil || got != secret {
		t.Fatalf("tenant secret on host-b: %q %v, want %q", got, err, secret)
	}
}
