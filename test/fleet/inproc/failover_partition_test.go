package inproc_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/cmd/vtpmd/daemon"
	"github.com/vtpmm/vtpmm/test/fleet"
	"github.com/vtpmm/vtpmm/test/fleet/inproc"
)

// invariants checks, every 100 ms until stop, what a failover must never
// break: at most one host runs the VM or could start it (its start rule
// admits a start), and no two hosts hold its key at the same generation.
type invariants struct {
	mu         sync.Mutex
	violations []string
	checks     int
}

func (iv *invariants) run(ctx context.Context, f *inproc.Fleet, vm fleet.VM, stop <-chan struct{}) {
	for {
		select {
		case <-stop:
			return
		case <-time.After(100 * time.Millisecond):
		}
		// The hypervisors first, all at once (in memory): the snapshot of
		// where the VM runs is atomic enough. Then each vtpmd's start rule
		// (registry reads): a host counts as able to start the VM only if
		// the same daemon is still up after every host was asked, so that
		// one fenced (killed) between two questions is not counted.
		var running []string
		for _, name := range f.HostNames() {
			if f.InProcHost(name).Running(ctx, vm) {
				running = append(running, name)
			}
		}
		type cand struct {
			what, name string
			d          *daemon.Daemon
		}
		var cands []cand
		gens := map[uint64]string{}
		var bad []string
		for _, name := range f.HostNames() {
			h := f.InProcHost(name)
			if !h.Up() {
				continue
			}
			d := h.Daemon()
			infos, err := d.Host().Keys().List(ctx)
			if err != nil {
				continue // closing
			}
			for _, k := range infos {
				if k.VMID != vm.UUID {
					continue
				}
				if other, ok := gens[k.Generation]; ok {
					bad = append(bad, fmt.Sprintf("%s and %s both hold generation %d", other, name, k.Generation))
				}
				gens[k.Generation] = name
				if _, err := d.Node().CheckStart(ctx, vm.UUID); err == nil {
					cands = append(cands, cand{fmt.Sprintf("%s (generation %d)", name, k.Generation), name, d})
				}
			}
		}
		var startable []string
		for _, c := range cands {
			if h := f.InProcHost(c.name); h.Up() && h.Daemon() == c.d {
				startable = append(startable, c.what)
			}
		}
		if len(running) > 1 {
			bad = append(bad, fmt.Sprintf("the VM runs on %v", running))
		}
		if len(startable) > 1 {
			bad = append(bad, fmt.Sprintf("%v may all start the VM", startable))
		}
		iv.mu.Lock()
		iv.checks++
		iv.violations = append(iv.violations, bad...)
		iv.mu.Unlock()
	}
}

// TestFailoverPartition (issue 15 tests): 20 seeded random schedules
// (FAILOVER_SCHEDULES sets another number, FAILOVER_SEED the first seed).
// Each cuts the VM's owner off the registry (its vtpmd keeps running the
// VM), crashes it (lease left to expire) or kills it (lease revoked),
// optionally after the tenant wrote to the vTPM, and heals it after a
// random delay (restart), before or after the standbys fenced it. An
// invariant checker runs throughout: never two hosts that run the VM or
// may start it, never one generation on two hosts. After each schedule
// the VM runs on exactly the registry's owner, and, when the replicas
// were current at the fault, the tenant's last secret unseals there.
func TestFailoverPartition(t *testing.T) {
	if testing.Short() {
		t.Skip("20 failovers: about 4 minutes")
	}
	ctx := context.Background()
	n, seed0 := 20, uint64(1)
	if s, err := strconv.Atoi(os.Getenv("FAILOVER_SCHEDULES")); err == nil && s > 0 {
		n = s
	}
	if s, err := strconv.ParseUint(os.Getenv("FAILOVER_SEED"), 10, 64); err == nil {
		seed0 = s
	}
	var logf func(string) logrus.FieldLogger
	if dir := os.Getenv("FAILOVER_LOG_DIR"); dir != "" { // the daemons' logs, one file per host
		logf = func(host string) logrus.FieldLogger {
			l := logrus.New()
			l.SetFormatter(&logrus.JSONFormatter{})
			if w, err := os.OpenFile(filepath.Join(dir, host+".log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600); err == nil {
				l.SetOutput(w)
			}
			return l
		}
	}
	f, err := inproc.New(ctx, inproc.Config{Hosts: trusted(fleet.HostA, fleet.HostB, fleet.HostC), RegistryTTL: 2 * time.Second, FenceAgent: true, Log: logf,
		Configure: func(_ string, c *daemon.Config) {
			c.Standby = daemon.StandbyConfig{Count: 2, MaxLag: "3s", Failover: "auto"}
		}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = f.Close(context.Background()) })
	vm, err := f.CreateVM(ctx, fleet.HostA, "partition-1")
	if err != nil {
		t.Fatal(err)
	}
	iv := &invariants{}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); iv.run(ctx, f, vm, stop) }()
	defer func() { close(stop); wg.Wait() }()
	faults := []string{"cut", "crash", "kill"}
	failovers := 0
	for i := range n {
		seed := seed0 + uint64(i)
		rng := rand.New(rand.NewPCG(seed, 0x15))
		owner, gen := ownerOf(ctx, f, vm)
		o := f.InProcHost(owner)
		var others []string
		for _, h := range f.HostNames() {
			if h != owner {
				others = append(others, h)
			}
		}
		waitReplicas(t, f, vm, gen, others...)
		secret := ""
		if rng.IntN(2) == 0 {
			if secret, err = o.TenantReseal(ctx, vm); err != nil {
				t.Fatal(err)
			}
			waitFor(t, "replicas of the new state", time.Minute, func() bool {
				for _, h := range others {
					r := replicaOf(f.InProcHost(h).Daemon(), vm)
					if r == nil || string(r.Request.State) != string(readState(t, o, vm)) {
						return false
					}
				}
				return true
			})
		}
		fault := faults[rng.IntN(len(faults))]
		heal := time.Duration(rng.IntN(4000)) * time.Millisecond
		t.Logf("schedule %d (seed %d): owner %s at generation %d, fault %s, heal after %v, state written %v", i, seed, owner, gen, fault, heal, secret != "")
		switch fault {
		case "cut":
			err = o.CutRegistry()
		case "crash":
			err = o.Crash(ctx)
		case "kill":
			err = o.Kill(ctx)
		}
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(heal)
		if o.Up() { // cut: heal the partition (the host restarts)
			if err := o.Kill(ctx); err != nil {
				t.Fatal(err)
			}
		}
		if err := o.Restart(ctx); err != nil {
			t.Fatal(err)
		}
		// Settled: the registry's owner runs the VM, every host is up.
		var now string
		var ngen uint64
		settled := func() bool {
			now, ngen = ownerOf(ctx, f, vm)
			if now == "" || !f.InProcHost(now).Running(ctx, vm) {
				if now == owner && !o.Running(ctx, vm) && o.Up() {
					// The fence stopped the VM but no failover took
					// (the owner came back first): it starts it again
					// (F11 when the fencer is gone, else by its rule).
					_, _ = o.Daemon().Node().DefineSecret(ctx, vm.UUID)
					_ = o.Fake().StartDomain(ctx, vm.UUID)
				}
				return false
			}
			for _, h := range f.HostNames() {
				if !f.InProcHost(h).Up() {
					_ = f.InProcHost(h).Restart(ctx)
					return false
				}
			}
			return true
		}
		// Settled for good: the same owner and generation again after
		// longer than a lease TTL and a fence (a standby may still be
		// fencing the host that came back).
		for round := 0; ; round++ {
			waitFor(t, "settled", 2*time.Minute, settled)
			was, wgen := now, ngen
			time.Sleep(4 * time.Second)
			if settled() && now == was && ngen == wgen {
				break
			}
			if round == 10 {
				t.Fatalf("schedule %d: never settled", i)
			}
		}
		if now != owner {
			failovers++
			if ngen != gen+1 {
				t.Fatalf("schedule %d: failover to %s at generation %d, want %d", i, now, ngen, gen+1)
			}
		}
		if secret != "" {
			got, err := f.InProcHost(now).TenantSecret(ctx, vm)
			if err != nil || got != secret {
				t.Fatalf("schedule %d: tenant secret on %s: %q %v, want %q", i, now, got, err, secret)
			}
		}
		iv.mu.Lock()
		bad := iv.violations
		iv.mu.Unlock()
		if len(bad) > 0 {
			t.Fatalf("schedule %d (seed %d, at %s): %v", i, seed, time.Now().UTC().Format(time.RFC3339Nano), bad)
		}
		t.Logf("schedule %d: the VM runs on %s at generation %d", i, now, ngen)
	}
	iv.mu.Lock()
	defer iv.mu.Unlock()
	t.Logf("%d schedules, %d failovers, %d invariant checks, %d violations", n, failovers, iv.checks, len(iv.violations))
}

// readState reads the VM's vTPM state file on h.
func readState(t *testing.T, h *inproc.Host, vm fleet.VM) []byte {
	dir, err := h.Fake().VTPMStateDir(context.Background(), vm.UUID)
	if err != nil {
		return nil
	}
	b, _ := os.ReadFile(dir + "/tpm2-00.permall")
	return b
}
