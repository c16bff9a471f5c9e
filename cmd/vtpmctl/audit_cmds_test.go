package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/internal/audit"
)

// auditLog writes a five-record audit log (the records of internal/audit's
// golden log) and returns its path and bytes.
func auditLog(t *testing.T, dir string) (string, []byte) {
	t.Helper()
	p := filepath.Join(dir, "chain.log")
	now := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	l, err := audit.Open(p, audit.Options{Host: "host-a", Now: func() time.Time { now = now.Add(1500 * time.Millisecond); return now }})
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range []audit.Record{
		{Event: audit.EventKeyRelease, VM: "6f1c2b9e-2f0a-4d51-9a51-0c6a3f0d9e11", Peer: "host-b", Generation: 3, Detail: "batch of 1"},
		{Event: audit.EventKeyReleaseRefused, VM: "0b7e5d2c-8f43-4a8e-b1f0-5d2f9a7c3e20", Peer: "host-c", Generation: 7, Rule: "pcr-7", Detail: "PCR 7 differs from policy"},
		{Event: audit.EventMigrationCommit, VM: "6f1c2b9e-2f0a-4d51-9a51-0c6a3f0d9e11", Peer: "host-b", Generation: 4},
		{Event: audit.EventMigrationAbort, VM: "9d3a7e61-1c2b-4f08-8e5d-7a6b5c4d3e2f", Peer: "host-b", Generation: 2, Detail: "libvirt: <migration failed> & retried"},
		{Event: audit.EventBackup, VM: "9d3a7e61-1c2b-4f08-8e5d-7a6b5c4d3e2f", Generation: 2, Detail: "ünïcode détail"},
	} {
		if err := l.Append(context.Background(), r); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return p, b
}

func TestAuditCommands(t *testing.T) {
	requireWired(t, "audit")
	dir := t.TempDir()
	auditGolden, good := auditLog(t, dir)
	write := func(name string, data []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	sum, err := audit.Verify(bytes.NewReader(good))
	if err != nil {
		t.Fatal(err)
	}
	tampered := write("tampered.log", bytes.Replace(good, []byte(`"generation":4`), []byte(`"generation":5`), 1))
	truncated := write("truncated.log", good[:len(good)-20])

	// A log whose detail tries to inject terminal escapes and break the table.
	hostile := filepath.Join(dir, "hostile.log")
	l, err := audit.Open(hostile, audit.Options{Host: "host-a", Now: func() time.Time { return time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC) }})
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Append(context.Background(), audit.Record{Event: audit.EventKeyRelease, Detail: "ok\x1b[2J\tfake\ncolumn"}); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}

	vm1 := "6f1c2b9e-2f0a-4d51-9a51-0c6a3f0d9e11"
	tests := []struct {
		name       string
		args       []string
		wantCode   int
		wantOut    []string
		notOut     []string
		wantErrOut []string
	}{
		{"verify intact", []string{"audit", "verify", auditGolden}, 0,
			[]string{"5 records, chain intact, head " + sum.Last + "\n"}, nil, nil},
		{"verify tampered", []string{"audit", "verify", tampered}, 2, nil, nil,
			[]string{"record 3: hash mismatch (edited?)"}},
		{"verify truncated", []string{"audit", "verify", truncated}, 3, nil, nil,
			[]string{"line 5: incomplete last line", "vtpmd removes the incomplete line"}},
		{"verify missing file", []string{"audit", "verify", filepath.Join(dir, "nope.log")}, 1, nil, nil, []string{"no such file"}},
		{"show all", []string{"audit", "show", auditGolden}, 0,
			[]string{"SEQ  TIME", "key-release-refused", "PCR 7 differs from policy", "libvirt: <migration failed> & retried", "ünïcode détail"}, nil, nil},
		{"show --vm", []string{"audit", "show", auditGolden, "--vm", vm1}, 0,
			[]string{"key-release ", "migration-commit"}, []string{"key-release-refused", "migration-abort", "backup"}, nil},
		{"show --event", []string{"audit", "show", auditGolden, "--event", "migration-abort"}, 0,
			[]string{"migration-abort"}, []string{"key-release", "migration-commit"}, nil},
		{"show nothing matches", []string{"audit", "show", auditGolden, "--vm", "nope"}, 0,
			[]string{"(no matching records)"}, nil, nil},
		{"show stops at a broken record", []string{"audit", "show", tampered}, 2,
			[]string{"key-release-refused"}, []string{"migration-commit"}, []string{"record 3: hash mismatch", "not shown"}},
		{"show quotes control characters", []string{"audit", "show", hostile}, 0,
			[]string{`"ok\x1b[2J\tfake\ncolumn"`}, []string{"\x1b"}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, stdout, stderr := runCtl(t, tt.args...)
			if code != tt.wantCode {
				t.Fatalf("exit %d, want %d\nstdout: %s\nstderr: %s", code, tt.wantCode, stdout, stderr)
			}
			for _, w := range tt.wantOut {
				if !strings.Contains(stdout, w) {
					t.Errorf("stdout lacks %q:\n%s", w, stdout)
				}
			}
			for _, w := range tt.notOut {
				if strings.Contains(stdout, w) {
					t.Errorf("stdout has %q:\n%s", w, stdout)
				}
			}
			for _, w := range tt.wantErrOut {
				if !strings.Contains(stderr, w) {
					t.Errorf("stderr lacks %q:\n%s", w, stderr)
				}
			}
		})
	}
}
