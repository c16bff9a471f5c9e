package inproc_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/test/fleet"
	"github.com/vtpmm/vtpmm/test/fleet/inproc"
)

// BenchmarkMigrateRegistry moves a VM between host-a and host-b through
// the admin API ('vtpmctl migrate') on the in-process fleet with the
// registry embedded (three members), and reports the source's registry
// round trips per migration (Begin, Commit), their wall time, the whole
// migration's, and the registry's share of it. It reports; it asserts
// nothing about time.
//
//	go test ./test/fleet/inproc -run '^$' -bench MigrateRegistry -benchtime 20x
func BenchmarkMigrateRegistry(b *testing.B) {
	ctx := context.Background()
	f, err := inproc.New(ctx, inproc.Config{Hosts: []inproc.HostSpec{{Name: fleet.HostA}, {Name: fleet.HostB}, {Name: fleet.HostC}}})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = f.Close(context.Background()) })
	vm, err := f.CreateVM(ctx, fleet.HostA, "bench-1")
	if err != nil {
		b.Fatal(err)
	}
	hosts := [2]string{fleet.HostA, fleet.HostB}
	var rtt int
	var regTime, wall time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		src, dst := hosts[i%2], hosts[(i+1)%2]
		t0 := time.Now()
		end, err := f.Host(src).Admin().Migrate(ctx, adminapi.MigrateRequest{VMs: []string{vm.Name}, To: dst}, nil)
		wall += time.Since(t0)
		if err != nil {
			b.Fatalf("migration %d %s->%s: %v", i, src, dst, err)
		}
		rtt += end.Result.Registry.RoundTrips
		regTime += end.Result.Registry.Time
	}
	b.StopTimer()
	n := float64(b.N)
	b.ReportMetric(float64(rtt)/n, "registry-rtt/migration")
	b.ReportMetric(float64(regTime.Microseconds())/1000/n, "registry-ms/migration")
	b.ReportMetric(float64(wall.Microseconds())/1000/n, "wall-ms/migration")
	b.ReportMetric(100*regTime.Seconds()/wall.Seconds(), "registry-%")
}

// BenchmarkEnrollNthHost enrols the Nth host of an in-process fleet (mode
// etcd: three external members, N hosts as clients) once, as 'vtpmctl host
// enroll' does, and reports the operator's registry requests, the time,
// the registry reads of the vtpmd that checks the new host's TPM (it looks
// the host's address up), and the registry round trips every other host
// made meanwhile (their own periodic work only: the enrolment asks nothing
// of them). Run it once per size:
//
//	go test ./test/fleet/inproc -run '^$' -bench EnrollNthHost -benchtime 1x -timeout 30m
func BenchmarkEnrollNthHost(b *testing.B) {
	for _, n := range []int{3, 50} {
		b.Run(fmt.Sprintf("N=%d", n), func(b *testing.B) {
			ctx := context.Background()
			specs := make([]inproc.HostSpec, n)
			for i := range specs {
				specs[i] = inproc.HostSpec{Name: fmt.Sprintf("host-%02d", i+1)}
			}
			t0 := time.Now()
			f, err := inproc.New(ctx, inproc.Config{Hosts: specs, Registry: registry.ModeEtcd, EnrollLast: true})
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { _ = f.Close(context.Background()) })
			b.Logf("fleet of %d hosts up and %d enrolled in %v", n, n-1, time.Since(t0).Round(time.Millisecond))
			last := specs[n-1].Name
			others := map[string]int64{}
			for _, s := range specs[:n-1] {
				others[s.Name] = f.InProcHost(s.Name).Daemon().RegistryClient().RoundTrips()
			}
			newHost := f.InProcHost(last).Daemon().RegistryClient().RoundTrips()
			b.ResetTimer()
			rep, err := f.EnrollVia(ctx, f.Host(specs[0].Name).Admin(), last)
			b.StopTimer()
			if err != nil {
				b.Fatal(err)
			}
			var otherOps, viaOps int64
			for name, before := range others {
				n := f.InProcHost(name).Daemon().RegistryClient().RoundTrips() - before
				if name == specs[0].Name {
					viaOps = n // the vtpmd that checks the TPM looks the new host up
					continue
				}
				otherOps += n
			}
			b.ReportMetric(float64(viaOps), "checking-host-ops")
			b.ReportMetric(float64(rep.RegistryOps), "operator-ops")
			b.ReportMetric(float64(otherOps), "other-hosts-ops")
			b.ReportMetric(float64(f.InProcHost(last).Daemon().RegistryClient().RoundTrips()-newHost), "new-host-ops")
			b.ReportMetric(float64(rep.Took.Microseconds())/1000, "enrol-ms")
			b.ReportMetric(float64(rep.Check.Microseconds())/1000, "tpm-check-ms")
			b.ReportMetric(float64(rep.Took-rep.Check)/1e6, "registry-ms")
		})
	}
}
