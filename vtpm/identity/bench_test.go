package identity_test

import (
	"context"
	"crypto/rand"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/identity"
	"github.com/vtpmm/vtpmm/vtpm/tpmtest"
)

// dtpmMeter counts commands and accounts the modelled discrete-TPM time
// without sleeping.
func dtpmMeter(tpm transport.TPM) *vtpm.Meter {
	return vtpm.NewMeter(tpm, vtpm.ProfileDTPM, vtpm.WithSleep(func(time.Duration) {}))
}

// report reports TPM commands and modelled dtpm time per operation. It
// never asserts anything about time.
func report(b *testing.B, st vtpm.Stats) {
	b.ReportMetric(float64(st.Total)/float64(b.N), "tpm-cmds/op")
	b.ReportMetric(float64(st.Injected.Milliseconds())/float64(b.N), "dtpm-ms/op")
	b.Logf("N=%d: %s", b.N, st)
}

func benchNonce(b *testing.B) []byte {
	n := make([]byte, 32)
	if _, err := rand.Read(n); err != nil {
		b.Fatal(err)
	}
	return n
}

// unprovision evicts the SRK, AK and MK: the TPM is then as fresh as a
// newly installed host's (its EKs stay, as a manufacturer ships them).
func unprovision(b *testing.B, tpm transport.TPM) {
	for _, h := range []tpm2.TPMHandle{identity.DefaultAKHandle, identity.DefaultMKHandle, vtpm.DefaultSRKHandle} {
		rp, err := tpm2.ReadPublic{ObjectHandle: h}.Execute(tpm)
		if err != nil {
			continue
		}
		if _, err := (tpm2.EvictControl{Auth: tpm2.TPMRHOwner, ObjectHandle: &tpm2.NamedHandle{Handle: h, Name: rp.Name},
			PersistentHandle: h}).Execute(tpm); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkEvidenceCold: a fresh host TPM (no SRK, AK or MK) provisions and
// produces its first evidence.
func BenchmarkEvidenceCold(b *testing.B) {
	_, tpm := tpmtest.NewHost(b)
	ctx := context.Background()
	m := dtpmMeter(tpm)
	nonce := benchNonce(b)
	var total vtpm.Stats
	for b.Loop() {
		b.StopTimer()
		unprovision(b, tpm)
		before := m.Stats()
		b.StartTimer()
		id, err := identity.Provision(ctx, m, identity.ProvisionOptions{})
		if err != nil {
			b.Fatal(err)
		}
		if _, err := identity.Produce(ctx, m, identity.ProduceOptions{HostID: "bench", Nonce: nonce, Identity: id, Now: time.Now}); err != nil {
			b.Fatal(err)
		}
		total = addStats(total, m.Stats().Sub(before))
	}
	report(b, total)
}

// BenchmarkEvidenceWarm: evidence on a provisioned TPM, with the identity
// cached in memory (vtpmd) or read for each evidence (vtpmd evidence CLI).
func BenchmarkEvidenceWarm(b *testing.B) {
	for _, tc := range []struct {
		name   string
		cached bool
	}{{"cached-identity", true}, {"read-identity", false}} {
		b.Run(tc.name, func(b *testing.B) {
			_, tpm := tpmtest.NewHost(b)
			ctx := context.Background()
			id, err := identity.Provision(ctx, tpm, identity.ProvisionOptions{})
			if err != nil {
				b.Fatal(err)
			}
			if !tc.cached {
				id = nil
			}
			m := dtpmMeter(tpm)
			nonce := benchNonce(b)
			for b.Loop() {
				if _, err := identity.Produce(ctx, m, identity.ProduceOptions{HostID: "bench", Nonce: nonce, Identity: id, Now: time.Now}); err != nil {
					b.Fatal(err)
				}
			}
			report(b, m.Stats())
		})
	}
}

// BenchmarkUnwrap: the destination imports one wrapped key (a transfer key
// wrapping a whole batch of VM keys) under its MK.
func BenchmarkUnwrap(b *testing.B) {
	_, tpm := tpmtest.NewHost(b)
	ctx := context.Background()
	id, err := identity.Provision(ctx, tpm, identity.ProvisionOptions{})
	if err != nil {
		b.Fatal(err)
	}
	w, err := identity.Wrap(rand.Reader, id.MK.Public, make([]byte, 32))
	if err != nil {
		b.Fatal(err)
	}
	m := dtpmMeter(tpm)
	for b.Loop() {
		if _, err := identity.Unwrap(ctx, m, id.MK, w, identity.UnwrapOptions{}); err != nil {
			b.Fatal(err)
		}
	}
	report(b, m.Stats())
}

func addStats(a, b vtpm.Stats) vtpm.Stats {
	out := vtpm.Stats{ByCode: map[tpm2.TPMCC]int{}, Total: a.Total + b.Total, Injected: a.Injected + b.Injected}
	for k, v := range a.ByCode {
		out.ByCode[k] += v
	}
	for k, v := range b.ByCode {
		out.ByCode[k] += v
	}
	return out
}
