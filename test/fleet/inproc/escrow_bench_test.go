package inproc_test

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/cmd/vtpmd/daemon"
	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/test/fleet"
	"github.com/vtpmm/vtpmm/test/fleet/inproc"
)

// BenchmarkBackup100VMs backs up 100 VMs of one real vtpmd ('vtpmctl
// backup --all -o DIR') with 2-of-3 X25519 custodians and reports the
// time and the host TPM commands per backup of all 100 (goal 0: the vault
// key is in memory). The VMs are created by the daemon (key, encrypted
// swtpm state, registry record) without running them. It reports; it
// asserts nothing about time.
//
//	go test ./test/fleet/inproc -run '^$' -bench Backup100VMs -benchtime 5x -timeout 30m
func BenchmarkBackup100VMs(b *testing.B) {
	const n = 100
	ctx := context.Background()
	c := newCustodians(b)
	f, err := inproc.New(ctx, inproc.Config{
		Hosts: []inproc.HostSpec{{Name: fleet.HostA}, {Name: fleet.HostB}, {Name: fleet.HostC}},
		Configure: func(_ string, dc *daemon.Config) {
			dc.Escrow = c.cfg
			dc.Backup = daemon.BackupConfig{Keep: 1}
		},
	})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = f.Close(context.Background()) })
	a := f.InProcHost(fleet.HostA)
	t0 := time.Now()
	for i := range n {
		if _, err := a.Daemon().CreateVM(ctx, fmt.Sprintf("bk-%03d", i), ""); err != nil {
			b.Fatal(err)
		}
	}
	b.Logf("%d VMs created in %v", n, time.Since(t0).Round(time.Millisecond))
	dir := filepath.Join(b.TempDir(), "bundles")
	var tpm, bytes int
	var took time.Duration
	b.ResetTimer()
	for range b.N {
		tpm0 := a.Daemon().Host().Meter().Stats()
		rep, err := a.Admin().Backup(ctx, adminapi.BackupRequest{All: true, Dir: dir})
		tpm += a.Daemon().Host().Meter().Stats().Sub(tpm0).Total
		if err != nil || rep.Failed() != 0 || len(rep.Items) != n {
			b.Fatalf("backup: %d items, %d failed, %v", len(rep.Items), rep.Failed(), err)
		}
		took += rep.Took
		for _, it := range rep.Items {
			bytes += it.Bytes
		}
	}
	b.StopTimer()
	runs := float64(b.N)
	b.ReportMetric(float64(tpm)/runs, "host-tpm-cmds/backup")
	b.ReportMetric(took.Seconds()/runs, "s/backup-of-100")
	b.ReportMetric(took.Seconds()*1000/runs/n, "ms/VM")
	b.ReportMetric(float64(bytes)/runs/n, "B/bundle")
}
