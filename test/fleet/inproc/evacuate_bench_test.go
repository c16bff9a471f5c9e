package inproc_test

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/migrate/evacuate"
	"github.com/vtpmm/vtpmm/migrate/registry/operator"
	"github.com/vtpmm/vtpmm/test/fleet"
	"github.com/vtpmm/vtpmm/test/fleet/inproc"
	"github.com/vtpmm/vtpmm/vtpm"
)

// BenchmarkEvacuate10, 100 and 400 evacuate host-a's N VMs to four
// destinations (host-b..host-e) on the in-process fleet: real vtpmds and
// swtpm host TPMs under the dtpm latency profile, real swtpm vTPMs, the
// fake hypervisor, the registry embedded (five etcd members), through the
// admin API as 'vtpmctl evacuate host-a' does, --parallel 4. Two
// sub-benchmarks on one fleet: cold (no destination's evidence is fresh:
// the plan attests every destination) and warm (a dry run just before,
// untimed and unmetered, left every destination's evidence fresh, as
// docs/evacuation.md recommends). Each iteration creates N new VMs on
// host-a (untimed), evacuates them, and undrains host-a. It reports, per
// evacuation:
//
//   - src-tpm-cmds/vm: host TPM commands on the source per VM;
//   - dst-tpm-cmds/batch: host TPM commands on the destinations per batch
//     (the plan's attestations included);
//   - registry-rtt/batch: the batches' registry round trips (claim and
//     group commit) per batch;
//   - tpm-ms-modelled: the modelled host TPM time of every host (dtpm);
//   - batches, wall-ms.
//
// It reports; it asserts nothing about time. Run each size once:
//
//	go test ./test/fleet/inproc -run '^$' -bench 'Evacuate10$' -benchtime 1x -timeout 30m
func BenchmarkEvacuate10(b *testing.B)  { benchEvacuate(b, 10) }
func BenchmarkEvacuate100(b *testing.B) { benchEvacuate(b, 100) }
func BenchmarkEvacuate400(b *testing.B) { benchEvacuate(b, 400) }

func benchEvacuate(b *testing.B, n int) {
	ctx := context.Background()
	dests := []string{fleet.HostB, fleet.HostC, hostD, "host-e"}
	specs := []inproc.HostSpec{{Name: fleet.HostA}}
	for _, d := range dests {
		specs = append(specs, inproc.HostSpec{Name: d})
	}
	t0 := time.Now()
	f, err := inproc.New(ctx, inproc.Config{Hosts: specs, TPMProfile: "dtpm", RegistryTTL: 10 * time.Second})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = f.Close(context.Background()) })
	b.Logf("fleet of %d hosts up in %v", len(specs), time.Since(t0).Round(time.Millisecond))
	for _, d := range dests {
		f.SetFreeMemory(d, 1<<40) // 1 TiB: room for 400 VMs of 1 GiB on any destination
	}
	made := 0
	for _, warm := range []bool{false, true} {
		name := "cold"
		if warm {
			name = "warm"
		}
		b.Run(name, func(b *testing.B) { benchEvacuateOnce(b, f, n, warm, &made) })
	}
}

func benchEvacuateOnce(b *testing.B, f *inproc.Fleet, n int, warm bool, made *int) {
	ctx := context.Background()
	src := f.InProcHost(fleet.HostA)
	meters := map[string]*vtpm.Meter{}
	for _, h := range f.HostNames() {
		meters[h] = f.InProcHost(h).Daemon().Host().Meter()
	}
	var srcCmds, dstCmds, batches, rtt int
	var modelled, wall time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		t1 := time.Now()
		for k := 0; k < n; k++ {
			*made++
			if _, err := f.CreateVM(ctx, fleet.HostA, fmt.Sprintf("bench-%d", *made)); err != nil {
				b.Fatal(err)
			}
		}
		b.Logf("%d VMs created on host-a in %v", n, time.Since(t1).Round(time.Millisecond))
		if warm {
			end, err := src.Admin().Evacuate(ctx, adminapi.EvacuateRequest{Host: fleet.HostA, DryRun: true}, nil)
			if err != nil || end.ExitCode != evacuate.ExitOK {
				b.Fatalf("dry run: exit %d %s %v", end.ExitCode, end.Error, err)
			}
		}
		before := map[string]vtpm.Stats{}
		for h, m := range meters {
			before[h] = m.Stats()
		}
		st0 := src.Daemon().EvacuationStats()
		b.StartTimer()
		t2 := time.Now()
		var left []string
		end, err := operator.Evacuate(ctx, f.Operator(), src.Admin(), adminapi.EvacuateRequest{Host: fleet.HostA, Parallel: evacuate.DefaultParallel}, func(line []byte) error {
			var ev evacuate.Event
			if json.Unmarshal(line, &ev) == nil && ev.Type == evacuate.EventPlan {
				for _, h := range ev.Plan.Hosts {
					if !h.Eligible && h.Host != fleet.HostA {
						left = append(left, fmt.Sprintf("%s (%s %s)", h.Host, h.Reason, h.Detail))
					}
				}
			}
			return nil
		})
		wall += time.Since(t2)
		b.StopTimer()
		if err != nil || end.ExitCode != evacuate.ExitOK {
			b.Fatalf("evacuation %d: exit %d %s %v", i, end.ExitCode, end.Error, err)
		}
		if len(left) > 0 {
			b.Logf("hosts left out of the plan: %v", left)
		}
		st := src.Daemon().EvacuationStats()
		batches += st.Batches - st0.Batches
		rtt += st.ClaimRTT - st0.ClaimRTT + st.CommitRTT - st0.CommitRTT
		for h, m := range meters {
			d := m.Stats().Sub(before[h])
			modelled += d.Injected
			if h == fleet.HostA {
				srcCmds += d.Total
			} else {
				dstCmds += d.Total
			}
		}
		if err := f.Operator().SetState(ctx, fleet.HostA, "active"); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	b.StopTimer()
	runs := float64(b.N)
	b.ReportMetric(float64(srcCmds)/float64(n)/runs, "src-tpm-cmds/vm")
	b.ReportMetric(float64(dstCmds)/float64(max(batches, 1)), "dst-tpm-cmds/batch")
	b.ReportMetric(float64(rtt)/float64(max(batches, 1)), "registry-rtt/batch")
	b.ReportMetric(float64(modelled.Milliseconds())/runs, "tpm-ms-modelled")
	b.ReportMetric(float64(batches)/runs, "batches")
	b.ReportMetric(float64(wall.Milliseconds())/runs, "wall-ms")
}
