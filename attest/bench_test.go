package attest

import (
	"context"
	"syscall"
	"testing"
	"time"
)

// cpuTime is the process's user+system CPU time so far. The machines the
// benchmarks run on are shared: wall time per operation depends on the
// load, CPU time much less. Run with -cpu 1 so the process uses one core.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// report adds verifications per wall-clock second and per CPU second.
func report(b *testing.B, cpu0 time.Duration) {
	cpu := cpuTime(b) - cpu0
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "verifications/s")
	if cpu > 0 {
		b.ReportMetric(float64(b.N)/cpu.Seconds(), "verifications/cpu-s")
	}
}

// benchPool is the number of distinct evidence bundles a benchmark cycles
// through: every bundle answers its own nonce, so nothing that depends on
// the nonce (quote and certification signatures) can be served twice from
// a cache.
const benchPool = 512

func benchEvidence(b *testing.B, h *fakeHost) ([]*Evidence, [][]byte) {
	b.Helper()
	evs := make([]*Evidence, benchPool)
	nonces := make([][]byte, benchPool)
	for i := range evs {
		n := testNonce(byte(i))
		n[31], n[30] = byte(i), byte(i>>8)
		nonces[i] = n
		evs[i] = h.evidence(b, n)
	}
	return evs, nonces
}

// BenchmarkVerifyCold verifies a host the verifier has never seen: a new
// Verifier per call (empty caches), so the EK chain, the public areas and
// the event log are parsed and verified every time.
//
//	go test ./attest -run XXX -bench 'BenchmarkVerify(Cold|Warm)' -cpu 1
func BenchmarkVerifyCold(b *testing.B) {
	h := newFakeHost(b)
	proto := h.verifier(b)
	evs, nonces := benchEvidence(b, h)
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	cpu0 := cpuTime(b)
	for i := 0; i < b.N; i++ {
		v := &Verifier{Roots: proto.Roots, Policy: proto.Policy, Enrollments: proto.Enrollments, Clock: proto.Clock}
		if _, err := v.Verify(ctx, evs[i%benchPool], nonces[i%benchPool]); err != nil {
			b.Fatal(err)
		}
	}
	report(b, cpu0)
}

// BenchmarkVerifyWarm verifies a known, enrolled host with one long-lived
// Verifier: fresh evidence (its own nonce, quote and certification) every
// call, the same EK certificate, keys and event log.
func BenchmarkVerifyWarm(b *testing.B) {
	h := newFakeHost(b)
	v := h.verifier(b)
	evs, nonces := benchEvidence(b, h)
	ctx := context.Background()
	if _, err := v.Verify(ctx, evs[0], nonces[0]); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	cpu0 := cpuTime(b)
	for i := 0; i < b.N; i++ {
		if _, err := v.Verify(ctx, evs[i%benchPool], nonces[i%benchPool]); err != nil {
			b.Fatal(err)
		}
	}
	report(b, cpu0)
}
