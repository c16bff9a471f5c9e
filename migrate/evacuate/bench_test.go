package evacuate_test

import (
	"context"
	"testing"

	"github.com/vtpmm/vtpmm/migrate/evacuate"
	"github.com/vtpmm/vtpmm/migrate/evacuate/fake"
	"github.com/vtpmm/vtpmm/vtpm"
)

// BenchmarkRunFake* run a whole evacuation to 4 destinations on the fakes:
// the orchestration's own cost (planning, claims, events, report), with
// hypervisor migrations that take no time. They report, per evacuation:
//
//	registry-rtt/batch   the most registry round trips one batch took (claim + commit)
//	dst-tpm-cmds/batch   the most modelled TPM commands one destination ran (cold: + evidence)
//	tpm-ms-modelled      host TPM time of the run under the dtpm profile (first run: cold)
//	batches              destination batches
//
// The in-process benchmark with real vtpmd, swtpm and etcd is the
// integration's (BenchmarkEvacuate100 in issue #13).
func BenchmarkRunFake10(b *testing.B)  { benchRun(b, 10) }
func BenchmarkRunFake100(b *testing.B) { benchRun(b, 100) }
func BenchmarkRunFake400(b *testing.B) { benchRun(b, 400) }

func benchRun(b *testing.B, n int) {
	var rtt, cmds, batches, cold int
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		f := newFleet(b, n, GiB, uint64(n)*GiB, uint64(n)*GiB, uint64(n)*GiB, uint64(n)*GiB)
		p := f.process()
		e := f.evacuator(b, p, nil)
		b.StartTimer()
		rep, err := e.Run(context.Background(), evacuate.Options{})
		if err != nil || rep.ExitCode != evacuate.ExitOK {
			b.Fatalf("%v, exit %d", err, rep.ExitCode)
		}
		b.StopTimer()
		for _, r := range f.reg.TxRoundTrips() {
			rtt = max(rtt, r)
		}
		for _, c := range p.mover.DestTPMCommands() {
			cmds = max(cmds, c)
		}
		batches = len(f.reg.TxRoundTrips())
		cold = 0
		for _, a := range p.mover.Attestations() {
			cold += a
		}
		b.StartTimer()
	}
	b.ReportMetric(float64(rtt), "registry-rtt/batch")
	b.ReportMetric(float64(cmds), "dst-tpm-cmds/batch")
	b.ReportMetric(float64(evacuate.ModelTPM(vtpm.ProfileDTPM, batches, cold).Time.Milliseconds()), "tpm-ms-modelled")
	b.ReportMetric(float64(batches), "batches")
	_ = fake.UnwrapCmds
}
