package main

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/vtpm/tpmtest"
)

// The damaged-state and rollback tests of issue 10, through the real vtpmd
// command (Run): every file vtpmd reads at start, damaged, makes 'vtpmd
// run' refuse with an error that names the file, says what is wrong and
// what to do, and no Go stack trace; a restored old data directory is
// refused naming the rollback and 'vtpmd anchor accept'; one damaged key
// envelope marks its VM and leaves the others usable. Each case first
// shows the honest twin: the same directory, undamaged, serves.

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// vtpmdHost is one emulated host driven through Run.
type vtpmdHost struct {
	t    *testing.T
	dir  string
	data string
	cfg  string
}

func newVtpmdHost(t *testing.T) *vtpmdHost {
	h := tpmtest.StartHost(t)
	dir, err := os.MkdirTemp("/tmp", "vtpmd-state-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	v := &vtpmdHost{t: t, dir: dir, data: filepath.Join(dir, "data"), cfg: filepath.Join(dir, "vtpmd.yaml")}
	conf := "host_id: host-a\ndata_dir: " + v.data + "\nrun_dir: " + dir + "/run\ntpm: " + h.URI() + "\nevent_log: \"\"\n"
	if err := os.WriteFile(v.cfg, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	return v
}

// cmd runs a one-shot vtpmd command and returns stdout, stderr and error.
func (v *vtpmdHost) cmd(args ...string) (string, string, error) {
	var out, errb syncBuf
	err := Run(context.Background(), append([]string{"--config", v.cfg}, args...), strings.NewReader(""), &out, &errb, Deps{})
	return out.String(), errb.String(), err
}

func (v *vtpmdHost) must(args ...string) string {
	v.t.Helper()
	out, errb, err := v.cmd(args...)
	if err != nil {
		v.t.Fatalf("vtpmd %v: %v\n%s", args, err, errb)
	}
	return out
}

// serve runs 'vtpmd run' until it prints "ready:", then stops it. It
// returns the error of a run that ended before it was ready, with stderr.
func (v *vtpmdHost) serve() (string, error) {
	v.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	pr, pw := io.Pipe()
	var errb syncBuf
	done := make(chan error, 1)
	go func() {
		err := Run(ctx, []string{"--config", v.cfg, "run"}, strings.NewReader(""), pw, &errb, Deps{})
		pw.Close()
		done <- err
	}()
	sc := bufio.NewScanner(pr)
	for sc.Scan() {
		if strings.HasPrefix(sc.Text(), "ready:") {
			go func() { _, _ = io.Copy(io.Discard, pr) }()
			cancel()
			select {
			case err := <-done:
				if err != nil {
					v.t.Fatalf("vtpmd run stopped with %v", err)
				}
			case <-time.After(time.Minute):
				v.t.Fatal("vtpmd run did not stop")
			}
			return errb.String(), nil
		}
	}
	return errb.String(), <-done
}

// refused checks that 'vtpmd run' refuses to start, with an error that
// contains every want, and with no Go stack trace anywhere.
func (v *vtpmdHost) refused(what string, want ...string) {
	v.t.Helper()
	stderr, err := v.serve()
	if err == nil {
		v.t.Fatalf("%s: vtpmd run started", what)
	}
	for _, w := range want {
		if !strings.Contains(err.Error(), w) {
			v.t.Fatalf("%s: the refusal lacks %q:\n%v", what, w, err)
		}
	}
	for _, s := range []string{stderr, err.Error()} {
		if strings.Contains(s, "goroutine ") || strings.Contains(s, "panic") || strings.Contains(s, "fatal error") {
			v.t.Fatalf("%s: a stack trace or panic:\n%s", what, s)
		}
	}
	if !strings.Contains(stderr, "vtpmd: ") {
		v.t.Fatalf("%s: stderr does not carry the refusal:\n%s", what, stderr)
	}
	v.t.Logf("%s: %v", what, err)
}

func (v *vtpmdHost) serves(what string) {
	v.t.Helper()
	if stderr, err := v.serve(); err != nil {
		v.t.Fatalf("%s: vtpmd run refused: %v\n%s", what, err, stderr)
	}
}

// damage replaces file with what f makes of it and returns a func that
// puts the original back.
func (v *vtpmdHost) damage(file string, f func([]byte) []byte) func() {
	v.t.Helper()
	orig, err := os.ReadFile(file)
	if err != nil {
		v.t.Fatal(err)
	}
	if err := os.WriteFile(file, f(bytes.Clone(orig)), 0o600); err != nil {
		v.t.Fatal(err)
	}
	return func() {
		if err := os.WriteFile(file, orig, 0o600); err != nil {
			v.t.Fatal(err)
		}
	}
}

func TestRunRefusesDamagedState(t *testing.T) {
	t.Parallel()
	v := newVtpmdHost(t)
	v.must("init")
	v.must("vm", "create", "web-1", "--uuid", "0e2e0e2e-0000-4000-8000-0000000000d1")
	v.must("vm", "create", "web-2", "--uuid", "0e2e0e2e-0000-4000-8000-0000000000d2")
	v.serves("the honest twin")
	p := func(name string) string { return filepath.Join(v.data, name) }

	cases := []struct {
		name string
		file string
		f    func([]byte) []byte
		want []string
	}{
		{"truncated ledger", p("ledger.db"), func(b []byte) []byte { return b[:len(b)/2] }, []string{"ledger " + p("ledger.db"), "ledger file damaged", "truncated", "restore the ledger"}},
		{"bit flip in the ledger's meta page", p("ledger.db"), func(b []byte) []byte { b[16+20] ^= 0x40; return b }, []string{"ledger " + p("ledger.db"), "ledger file damaged", "meta page 0"}},
		{"ledger of zeros", p("ledger.db"), func(b []byte) []byte { return make([]byte, len(b)) }, []string{"ledger " + p("ledger.db"), "ledger file damaged"}},
		{"edited audit log", p("audit.log"), func(b []byte) []byte { return append(b, []byte("{\"seq\":1,\"event\":\"forged\"}\n")...) }, []string{"audit log " + p("audit.log"), "audit log tampered", "Move the file aside"}},
		{"damaged vault file", p("vault.json"), func(b []byte) []byte { return b[:len(b)/3] }, []string{"vault file " + p("vault.json"), "stored data is corrupt", "restore vault.json"}},
		{"edited anchor file", p("anchor.json"), func(b []byte) []byte { return bytes.Replace(b, []byte(`"advances": 0`), []byte(`"advances": 7`), 1) }, []string{"anchor file " + p("anchor.json"), "MAC does not verify", "vtpmd anchor accept"}},
		{"empty anchor file", p("anchor.json"), func([]byte) []byte { return nil }, []string{"anchor file " + p("anchor.json"), "the file is empty"}},
		{"unreadable host record", p("host.json"), func([]byte) []byte { return []byte("{") }, []string{"host.json", "stored data is corrupt"}},
		{"broken configuration", v.cfg, func(b []byte) []byte { return append(b, []byte("peers: [\n")...) }, []string{"load config " + v.cfg, "invalid configuration"}},
		{"unknown configuration field", v.cfg, func(b []byte) []byte { return append(b, []byte("tmp: x\n")...) }, []string{"load config " + v.cfg, "field tmp not found"}},
	}
	for _, tc := range cases {
		restore := v.damage(tc.file, tc.f)
		v.refused(tc.name, tc.want...)
		restore()
		v.serves("after restoring " + filepath.Base(tc.file))
	}

	// A missing anchor file while the TPM holds the anchor: refused, never
	// re-created.
	anchor, _ := os.ReadFile(p("anchor.json"))
	if err := os.Remove(p("anchor.json")); err != nil {
		t.Fatal(err)
	}
	v.refused("deleted anchor file", "anchor file missing while the TPM holds the anchor", "vtpmd anchor accept")
	if err := os.WriteFile(p("anchor.json"), anchor, 0o600); err != nil {
		t.Fatal(err)
	}

	// One damaged envelope: web-2 is marked with the reason, web-1 keeps
	// its generation and runs.
	restore := v.damage(p("keys/0e2e0e2e-0000-4000-8000-0000000000d2.key"), func(b []byte) []byte { return b[:len(b)-9] })
	stderr, err := v.serve()
	if err != nil {
		t.Fatalf("one damaged envelope stopped vtpmd: %v\n%s", err, stderr)
	}
	if !strings.Contains(stderr, "VM key envelope damaged") {
		t.Fatalf("vtpmd run did not report the damaged envelope:\n%s", stderr)
	}
	out := v.must("vm", "list")
	var web1, web2 string
	for _, l := range strings.Split(out, "\n") {
		switch {
		case strings.HasPrefix(l, "web-1"):
			web1 = l
		case strings.HasPrefix(l, "web-2"):
			web2 = l
		}
	}
	if !strings.Contains(web1, " 1 ") || !strings.HasSuffix(strings.TrimSpace(web1), "ok") || !strings.Contains(web2, "DAMAGED: key envelope") || !strings.Contains(web2, ".key") {
		t.Fatalf("vtpmd vm list:\n%s", out)
	}
	t.Logf("vtpmd vm list:\n%s", out)
	restore()
	v.serves("after restoring the envelope")
}

// TestRunRefusesRolledBackDataDir is issue 10's attack 6 on one host: the
// whole data directory restored from a backup, after an ownership step
// (here a VM's creation) was counted in the host TPM, is refused at start,
// naming the rollback, both counters and the way out; so is a single
// envelope deleted. 'vtpmd anchor accept' (audited) then lets it start.
func TestRunRefusesRolledBackDataDir(t *testing.T) {
	t.Parallel()
	v := newVtpmdHost(t)
	v.must("init")
	v.must("vm", "create", "web-1")
	v.serves("the honest twin")
	backup := filepath.Join(v.dir, "backup")
	if out, err := exec.Command("cp", "-a", v.data, backup).CombinedOutput(); err != nil {
		t.Fatalf("backup: %v %s", err, out)
	}
	v.must("vm", "create", "web-2")
	v.serves("after the second VM")
	if err := os.RemoveAll(v.data); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("cp", "-a", backup, v.data).CombinedOutput(); err != nil {
		t.Fatalf("restore: %v %s", err, out)
	}
	v.refused("restored data directory", "data directory rolled back", v.data+"/anchor.json", "restored from a backup", "vtpmd anchor accept")
	if _, _, err := v.cmd("vm", "list"); err == nil || !strings.Contains(err.Error(), "rolled back") {
		t.Fatalf("vtpmd vm list on the rolled-back directory: %v", err)
	}
	if _, _, err := v.cmd("anchor", "accept", "--operator", "alice"); err == nil || !strings.Contains(err.Error(), "--reason") {
		t.Fatalf("accept without a reason: %v", err)
	}
	out := v.must("anchor", "accept", "--operator", "alice", "--reason", "web-2 was created after the backup and is gone (ticket 4711)")
	if !strings.Contains(out, "anchor accepted by alice") {
		t.Fatalf("accept: %s", out)
	}
	log, _ := os.ReadFile(filepath.Join(v.data, "audit.log"))
	if !strings.Contains(string(log), `"event":"anchor-accept"`) || !strings.Contains(string(log), "ticket 4711") {
		t.Fatalf("the acceptance is not in the audit log:\n%s", log)
	}
	v.serves("after the acceptance")

	// One envelope deleted (a partial restore the other way round).
	keys, _ := filepath.Glob(filepath.Join(v.data, "keys", "*.key"))
	if len(keys) != 1 {
		t.Fatalf("keys %v", keys)
	}
	env, _ := os.ReadFile(keys[0])
	if err := os.Remove(keys[0]); err != nil {
		t.Fatal(err)
	}
	v.refused("deleted envelope", "key store does not match the rollback anchor", "the key store holds no key", "vtpmd anchor accept")
	if err := os.WriteFile(keys[0], env, 0o600); err != nil {
		t.Fatal(err)
	}
	v.serves("after putting the envelope back")

	// The audit log holds the acceptance: deleted, it is refused, never
	// re-created empty (vtpmd records the log's position at every start
	// and stop).
	logPath := filepath.Join(v.data, "audit.log")
	saved, _ := os.ReadFile(logPath)
	if err := os.Remove(logPath); err != nil {
		t.Fatal(err)
	}
	v.refused("deleted audit log", "audit log "+logPath, "audit log history lost", "Restore the log")
	if err := os.WriteFile(logPath, saved, 0o600); err != nil {
		t.Fatal(err)
	}
	v.serves("after restoring the audit log")
}
