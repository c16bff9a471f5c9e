package migrate_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/vtpm"
)

// The migration benchmarks report, per migration (one op moves every VM of
// the batch from one host to the other, alternating directions):
//
//	src-tpm-cmds/op  TPM commands on the source host
//	dst-tpm-cmds/op  TPM commands on the destination host
//	round-trips/op   agent round trips (before + after the hypervisor's migration)
//	dtpm-ms/op       TPM time of both hosts modelled under the dtpm profile
//
// ns/op is wall time on swtpm TPMs and the fake hypervisor (which moves real
// swtpm state). Nothing here asserts a time.

func BenchmarkMigrateWarm(b *testing.B) { benchMigrate(b, 1, 0) }
func BenchmarkMigrateCold(b *testing.B) { benchMigrate(b, 1, -1) }

// BenchmarkMigrateBatch100 moves 100 VMs to one destination, warm.
func BenchmarkMigrateBatch100(b *testing.B) { benchMigrate(b, 100, 0) }

func benchMigrate(b *testing.B, vms int, maxAge time.Duration) {
	ctx := context.Background()
	f := newFleet(b)
	f.maxAge = maxAge
	x, y := f.addHost("host-a", goodLog), f.addHost("host-b", goodLog)
	ids := batchVMs(b, x, vms)
	// Warm up both directions (evidence cached when maxAge allows).
	for _, pair := range [][2]*host{{x, y}, {y, x}} {
		if _, err := pair[0].node.Migrate(ctx, migrate.Request{VMs: ids, Dest: pair[1].name}, nil); err != nil {
			b.Fatal(err)
		}
	}
	var src, dst vtpm.Stats
	rt := 0
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		from, to := x, y
		if i%2 == 1 {
			from, to = y, x
		}
		s0, d0 := from.meter.Stats(), to.meter.Stats()
		res, err := from.node.Migrate(ctx, migrate.Request{VMs: ids, Dest: to.name}, nil)
		if err != nil {
			b.Fatal(err)
		}
		src, dst = add(src, from.meter.Stats().Sub(s0)), add(dst, to.meter.Stats().Sub(d0))
		rt += res.RoundTrips.Before + res.RoundTrips.After
	}
	b.StopTimer()
	n := float64(b.N)
	b.ReportMetric(float64(src.Total)/n, "src-tpm-cmds/op")
	b.ReportMetric(float64(dst.Total)/n, "dst-tpm-cmds/op")
	b.ReportMetric(float64(rt)/n, "round-trips/op")
	b.ReportMetric(float64((modelled(src)+modelled(dst)).Milliseconds())/n, "dtpm-ms/op")
}

func add(a, b vtpm.Stats) vtpm.Stats {
	out := vtpm.Stats{ByCode: map[tpm2.TPMCC]int{}}
	for _, s := range []vtpm.Stats{a, b} {
		for k, v := range s.ByCode {
			out.ByCode[k] += v
			out.Total += v
		}
	}
	return out
}

func modelled(s vtpm.Stats) time.Duration {
	var d time.Duration
	for cc, n := range s.ByCode {
		d += time.Duration(n) * vtpm.ProfileDTPM.Latency(cc)
	}
	return d
}

// batchVMs creates n running VMs on h. The first gets its own swtpm state
// (swtpm_setup with EK certificates, ~0.7 s); the others, to keep the
// fixture fast, get copies of that state under the same VM key. The
// protocol still seals, sends and opens one envelope per VM, and the
// hypervisor moves one real swtpm state per VM.
func batchVMs(b *testing.B, h *host, n int) []string {
	ctx := context.Background()
	first := h.createVM("vm0")
	if n == 1 {
		return []string{first}
	}
	k, _, err := h.keys.Get(ctx, first)
	if err != nil {
		b.Fatal(err)
	}
	defer k.Destroy()
	var pass []byte
	_ = k.WithPassphrase(func(p []byte) error { pass = bytes.Clone(p); return nil })
	src := filepath.Join(h.dir, "vms", first, "tpm2")
	ids := []string{first}
	for i := 1; i < n; i++ {
		id := newUUID(b)
		if err := h.keys.Put(ctx, id, 1, k); err != nil {
			b.Fatal(err)
		}
		dst := filepath.Join(h.dir, "vms", id, "tpm2")
		if err := os.MkdirAll(filepath.Dir(dst), 0o700); err != nil {
			b.Fatal(err)
		}
		if out, err := exec.Command("cp", "-a", src, dst).CombinedOutput(); err != nil {
			b.Fatalf("%v %s", err, out)
		}
		if err := h.hyp.DefineSecret(ctx, id, pass); err != nil {
			b.Fatal(err)
		}
		if err := h.hyp.DefineVTPMDomain(ctx, hypervisor.Domain{UUID: id, Name: fmt.Sprintf("vm%d", i)}, dst); err != nil {
			b.Fatal(err)
		}
		if err := h.hyp.StartDomain(ctx, id); err != nil {
			b.Fatal(err)
		}
		ids = append(ids, id)
	}
	return ids
}
