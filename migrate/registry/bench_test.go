package registry_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/migrate/registry/registrytest"
)

// BenchmarkCommitBatch: one migration batch's registry work, Begin (the
// CAS that checks owner, generation and destination and records the open
// transaction; its refusal carries the current records, so it is also the
// read) and Commit (the CAS that moves ownership), on real etcd members in
// this process (fsync on). Reports registry-rtt/batch (goal: at most 2).
//
//	go test ./migrate/registry -run '^$' -bench CommitBatch -benchtime 200x
func BenchmarkCommitBatch(b *testing.B) {
	for _, members := range []int{1, 3} {
		for _, n := range []int{1, 10, 100} {
			b.Run(fmt.Sprintf("members=%d/vms=%d", members, n), func(b *testing.B) {
				c := registrytest.Start(b, registrytest.Options{Members: members, Heartbeat: 100 * time.Millisecond, Election: time.Second})
				ctx := context.Background()
				op := c.Open(b, "root")
				registrytest.Enroll(b, op, "host-a", "host-b")
				cl := map[string]*registry.Client{"host-a": c.Open(b, "host-a"), "host-b": c.Open(b, "host-b")}
				vms := make([]registry.VMGen, n)
				for i := range vms {
					vms[i] = registry.VMGen{ID: fmt.Sprintf("vm-%03d", i), Generation: 1}
					if _, err := op.CreateVM(ctx, vms[i].ID, "host-a"); err != nil {
						b.Fatal(err)
					}
				}
				from, to := "host-a", "host-b"
				var rtt int64
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					src := cl[from]
					n0 := src.RoundTrips()
					bt := registry.Batch{TxID: fmt.Sprintf("tx-%d", i), From: from, To: to, VMs: vms}
					if _, err := src.Begin(ctx, bt); err != nil {
						b.Fatal(err)
					}
					if _, err := src.Commit(ctx, bt); err != nil {
						b.Fatal(err)
					}
					rtt += src.RoundTrips() - n0
					for j := range vms {
						vms[j].Generation++
					}
					from, to = to, from
				}
				b.ReportMetric(float64(rtt)/float64(b.N), "registry-rtt/batch")
				b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N)/float64(n), "µs/vm")
			})
		}
	}
}

// BenchmarkEnrollNthHost: what it costs to add the Nth host to a fleet
// whose registry has RBAC on: the operator gives it an etcd user and roles
// and writes its enrolment, the new host registers (address, identity,
// liveness lease). The N-1 hosts already there do nothing: they read the
// enrolment at their next trust check (or see it in a watch). Reports the
// etcd requests of each side (peer-to-peer enrolment costs every pair of
// hosts an Identity and an Activate exchange with a TPM command: 2(N-1)
// exchanges for the Nth host).
//
//	go test ./migrate/registry -run '^$' -bench EnrollNthHost -benchtime 20x
func BenchmarkEnrollNthHost(b *testing.B) {
	for _, n := range []int{3, 50} {
		b.Run(fmt.Sprintf("N=%d", n), func(b *testing.B) {
			c := registrytest.Start(b, registrytest.Options{Heartbeat: 100 * time.Millisecond, Election: time.Second})
			ctx := context.Background()
			cfg := c.Config("root")
			cfg.NoFollow = true
			op := c.OpenConfig(b, cfg)
			var hosts []string
			for i := 1; i < n; i++ {
				hosts = append(hosts, fmt.Sprintf("host-%d", i))
			}
			if _, err := op.Bootstrap(ctx, registry.BootstrapOptions{Hosts: hosts}); err != nil {
				b.Fatal(err)
			}
			registrytest.Enroll(b, op, hosts...)
			for _, h := range hosts {
				if err := c.Open(b, h).Register(ctx, hostRecord(h)); err != nil {
					b.Fatal(err)
				}
			}
			var opOps, hostOps int64
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				name := fmt.Sprintf("host-%d-%d", n, i)
				b.StopTimer()
				hcfg := c.Config(name) // issues its certificate (the PKI's part, not timed)
				b.StartTimer()
				n0 := op.RoundTrips()
				users, err := op.AddHostUser(ctx, name)
				if err != nil {
					b.Fatal(err)
				}
				if err := op.Enroll(ctx, registry.Enrolment{Host: name, Identity: registrytest.Identity(name)}); err != nil {
					b.Fatal(err)
				}
				opOps += int64(users) + op.RoundTrips() - n0
				hcfg.NoFollow = true
				h, err := registry.OpenClient(ctx, hcfg)
				if err != nil {
					b.Fatal(err)
				}
				if err := h.Register(ctx, hostRecord(name)); err != nil {
					b.Fatal(err)
				}
				hostOps += h.RoundTrips() + 1 // + the lease grant (not a KV request)
				b.StopTimer()
				h.Close()
				b.StartTimer()
			}
			b.ReportMetric(float64(opOps)/float64(b.N), "operator-ops/host")
			b.ReportMetric(float64(hostOps)/float64(b.N), "host-ops/host")
			b.ReportMetric(0, "peer-ops/host")
		})
	}
}
