package main

import (
	"bufio"
	"context"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/vtpmm/vtpmm/internal/audit"
	"github.com/vtpmm/vtpmm/vtpm/tpmtest"
)

// TestRunClosesOnSIGTERM runs 'vtpmd run' in this process as main does
// (its context ends on SIGTERM), waits for its "ready:" line, sends this
// process SIGTERM, and checks that run returned and let go of everything:
// the ledger and the audit log (both exclusively locked while open), the
// admin socket, the vTPM it ran and the host TPM ('vtpmd vault status'
// opens it again).
func TestRunClosesOnSIGTERM(t *testing.T) {
	h := tpmtest.StartHost(t)
	dir, err := os.MkdirTemp("/tmp", "vtpmd-term-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	cfg := filepath.Join(dir, "vtpmd.yaml")
	conf := "host_id: host-a\ndata_dir: " + dir + "/data\nrun_dir: " + dir + "/run\ntpm: " + h.URI() + "\nevent_log: \"\"\n"
	if err := os.WriteFile(cfg, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	run := func(args ...string) string {
		t.Helper()
		var out strings.Builder
		if err := Run(context.Background(), append([]string{"--config", cfg}, args...), strings.NewReader(""), &out, io.Discard, Deps{}); err != nil {
			t.Fatalf("vtpmd %v: %v", args, err)
		}
		return out.String()
	}
	run("init")
	run("vm", "create", "web-1")

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer stop()
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		err := Run(ctx, []string{"--config", cfg, "run"}, strings.NewReader(""), pw, io.Discard, Deps{})
		pw.Close()
		done <- err
	}()
	sc := bufio.NewScanner(pr)
	ready := false
	for sc.Scan() {
		t.Logf("vtpmd run: %s", sc.Text())
		if strings.HasPrefix(sc.Text(), "ready: 1 vTPM(s)") {
			ready = true
			break
		}
	}
	if !ready {
		t.Fatalf("vtpmd run ended before it was ready: %v", <-done)
	}
	go func() { _, _ = io.Copy(io.Discard, pr) }()
	if err := syscall.Kill(os.Getpid(), syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("vtpmd run after SIGTERM: %v", err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("vtpmd run did not return 60 s after SIGTERM")
	}

	db, err := bolt.Open(filepath.Join(dir, "data", "ledger.db"), 0o600, &bolt.Options{Timeout: 200 * time.Millisecond})
	if err != nil {
		t.Errorf("ledger still open after SIGTERM: %v", err)
	} else {
		db.Close()
	}
	l, err := audit.Open(filepath.Join(dir, "data", "audit.log"), audit.Options{Host: "host-a"})
	if err != nil {
		t.Errorf("audit log still open after SIGTERM: %v", err)
	} else {
		l.Close()
	}
	if _, err := os.Stat(filepath.Join(dir, "run", "vtpmd.sock")); !os.IsNotExist(err) {
		t.Errorf("admin socket left behind: %v", err)
	}
	socks, _ := filepath.Glob(filepath.Join(dir, "run", "*", "*"))
	for _, s := range socks {
		if st, err := os.Stat(s); err == nil && st.Mode()&os.ModeSocket != 0 {
			t.Errorf("vTPM socket %s left behind", s)
		}
	}
	if out := run("vault", "status"); !strings.Contains(out, "unseal cost") {
		t.Errorf("vault status after SIGTERM: %q", out)
	}
}
