package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestHookScriptFilters runs the installed script with /bin/sh for every
// event libvirt sends around a migration and a start: only the events
// vtpmm acts on (hookEvents) reach vtpmctl, with their arguments and stdin;
// the others exit 0 without starting it.
func TestHookScriptFilters(t *testing.T) {
	dir := t.TempDir()
	record := filepath.Join(dir, "calls")
	fake := filepath.Join(dir, "vtpmctl")
	// A stand-in for vtpmctl that records its arguments and stdin.
	if err := os.WriteFile(fake, []byte("#!/bin/sh\necho \"$*|$(cat)\" >> "+shellQuote(record)+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	p, err := installHook(filepath.Join(dir, "hooks"), fake, "/run/vtpmm/vtpmd.sock")
	if err != nil {
		t.Fatal(err)
	}
	events := [][2]string{
		{"migrate", "begin"}, {"prepare", "begin"}, {"start", "begin"}, {"started", "begin"},
		{"stopped", "end"}, {"release", "end"}, {"reconnect", "begin"}, {"restore", "begin"},
	}
	for _, ev := range events {
		cmd := exec.Command("/bin/sh", p, "vm1", ev[0], ev[1], "-")
		cmd.Stdin = strings.NewReader("<domain/>")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%v: %v %s", ev, err, out)
		}
	}
	b, _ := os.ReadFile(record)
	got := strings.Split(strings.TrimSpace(string(b)), "\n")
	var want []string
	for _, ev := range events {
		if _, ok := hookEvents[ev[0]+" "+ev[1]]; ok {
			want = append(want, "hook qemu --socket /run/vtpmm/vtpmd.sock vm1 "+ev[0]+" "+ev[1]+" -|<domain/>")
		}
	}
	if len(want) != 3 || strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("vtpmctl was run for:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}
