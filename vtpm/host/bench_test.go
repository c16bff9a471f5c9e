package host_test

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/host"
	"github.com/vtpmm/vtpmm/vtpm/tpmtest"
)

// The benchmarks report, per operation and latency profile:
//   tpm-cmds/op  host TPM commands
//   dtpm-ms/op   modelled host TPM time under the dtpm profile
// and ns/op is wall time with the profile's latency really injected.
// Run them with 'make bench'. They never assert times.

var profiles = []string{"none", "dtpm"}

// benchHost initialises a host and returns its config (the TPM is free).
func benchHost(b *testing.B, profile string) host.Config {
	b.Helper()
	h := tpmtest.StartHost(b)
	cfg := host.DefaultConfig()
	cfg.HostID = "bench"
	cfg.DataDir = shortRunDirB(b) + "/data"
	cfg.RunDir = shortRunDirB(b)
	cfg.TPM = h.URI()
	if _, err := host.Init(context.Background(), cfg, host.Options{}, host.InitOptions{}); err != nil {
		b.Fatal(err)
	}
	cfg.TPMProfile = profile
	return cfg
}

func report(b *testing.B, total int, st vtpm.Stats) {
	b.ReportMetric(float64(total)/float64(b.N), "tpm-cmds/op")
	model := time.Duration(0)
	for cc, n := range st.ByCode {
		model += time.Duration(n) * vtpm.ProfileDTPM.Latency(cc)
	}
	b.ReportMetric(float64(model.Milliseconds())/float64(b.N), "dtpm-ms/op")
}

func BenchmarkOpenVault(b *testing.B) {
	for _, p := range profiles {
		b.Run("profile="+p, func(b *testing.B) {
			ctx := context.Background()
			cfg := benchHost(b, p)
			var all vtpm.Stats
			total := 0
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				a, err := host.Open(ctx, cfg, host.Options{})
				if err != nil {
					b.Fatal(err)
				}
				st := a.Meter().Stats()
				total += st.Total
				all = merge(all, st)
				_ = a.Close(ctx)
			}
			report(b, total, all)
		})
	}
}

func BenchmarkOpenVMKey(b *testing.B) {
	for _, p := range profiles {
		b.Run("profile="+p, func(b *testing.B) {
			ctx := context.Background()
			a := openWithVM(b, p)
			uuid := vmUUID(b, a)
			before := a.Meter().Stats()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				k, _, err := a.Keys().Get(ctx, uuid)
				if err != nil {
					b.Fatal(err)
				}
				k.Destroy()
			}
			d := a.Meter().Stats().Sub(before)
			report(b, d.Total, d)
		})
	}
}

func BenchmarkCreateVTPM(b *testing.B) {
	for _, p := range profiles {
		b.Run("profile="+p, func(b *testing.B) {
			ctx := context.Background()
			a := openWithVM(b, p)
			before := a.Meter().Stats()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if _, err := a.CreateVM(ctx, fmt.Sprintf("bench-%d", i), ""); err != nil {
					b.Fatal(err)
				}
			}
			d := a.Meter().Stats().Sub(before)
			report(b, d.Total, d)
		})
	}
}

func BenchmarkStartVTPM(b *testing.B) {
	for _, p := range profiles {
		b.Run("profile="+p, func(b *testing.B) {
			ctx := context.Background()
			a := openWithVM(b, p)
			uuid := vmUUID(b, a)
			before := a.Meter().Stats()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if _, err := a.StartVM(ctx, uuid); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				if err := a.StopVM(ctx, uuid); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
			d := a.Meter().Stats().Sub(before)
			report(b, d.Total, d)
		})
	}
}

func openWithVM(b *testing.B, profile string) *host.Host {
	b.Helper()
	ctx := context.Background()
	cfg := benchHost(b, profile)
	a, err := host.Open(ctx, cfg, host.Options{})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = a.Close(ctx) })
	if _, err := a.CreateVM(ctx, "bench-vm", ""); err != nil {
		b.Fatal(err)
	}
	return a
}

func vmUUID(b *testing.B, a *host.Host) string {
	vms, err := a.ListVMs(context.Background())
	if err != nil || len(vms) == 0 {
		b.Fatal("no VM", err)
	}
	return vms[0].UUID
}

func merge(a, b vtpm.Stats) vtpm.Stats {
	out := vtpm.Stats{ByCode: map[tpm2.TPMCC]int{}}
	for k, v := range a.ByCode {
		out.ByCode[k] += v
	}
	for k, v := range b.ByCode {
		out.ByCode[k] += v
	}
	return out
}

func shortRunDirB(b *testing.B) string {
	d, err := os.MkdirTemp("/tmp", "vtpmm-bench-")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(d) })
	return d
}
