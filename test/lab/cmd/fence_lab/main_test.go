package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	t.Setenv("VTPMM_LAB_DIR", "/lab-env")
	tests := []struct {
		name  string
		args  []string
		stdin string
		want  options
		err   bool
	}{
		{"flags", []string{"--host", "host-a", "--action", "status", "--lab-dir", "/lab"}, "", options{"status", "host-a", "/lab"}, false},
		{"short flags, env dir, default off", []string{"-n", "host-b"}, "", options{"off", "host-b", "/lab-env"}, false},
		{"plug flag", []string{"--plug", "host-c", "-o", "off"}, "", options{"off", "host-c", "/lab-env"}, false},
		{"stdin as fenced passes it", nil, "# comment\naction=status\nplug=host-a\nlab_dir=/lab\nipaddr=ignored\n", options{"status", "host-a", "/lab"}, false},
		{"stdin port and old option name", nil, "option=off\nport=host-b\n", options{"off", "host-b", "/lab-env"}, false},
		{"stdin garbage", nil, "action\n", options{}, true},
		{"unknown flag", []string{"--bogus"}, "", options{}, true},
		{"extra argument", []string{"--host", "h", "x"}, "", options{}, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parse(tc.args, strings.NewReader(tc.stdin))
			if (err != nil) != tc.err {
				t.Fatalf("err %v, want error %v", err, tc.err)
			}
			if !tc.err && got != tc.want {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestRunExitCodes(t *testing.T) {
	lab := t.TempDir()
	// A host whose namespace inode no process has: off.
	if err := os.MkdirAll(filepath.Join(lab, "host-x"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(lab, "host-x", "netns"), []byte("vlab-x-1 1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		args []string
		code int
	}{
		{[]string{"--lab-dir", lab, "--host", "host-x", "--action", "status"}, exitOff},
		{[]string{"--lab-dir", lab, "--host", "host-x", "--action", "off"}, exitOK}, // nothing to kill: fenced
		{[]string{"--lab-dir", lab, "--host", "host-y", "--action", "status"}, exitErr},
		{[]string{"--lab-dir", lab, "--host", "../etc", "--action", "off"}, exitErr},
		{[]string{"--lab-dir", lab, "--action", "off"}, exitErr},
		{[]string{"--lab-dir", lab, "--host", "host-x", "--action", "reboot"}, exitErr},
		{[]string{"--lab-dir", lab, "--action", "monitor"}, exitOK},
		{[]string{"--action", "metadata"}, exitOK},
	}
	for _, tc := range tests {
		var out, errb bytes.Buffer
		if code := run(tc.args, strings.NewReader(""), &out, &errb); code != tc.code {
			t.Errorf("fence_lab %v: exit %d, want %d (%s%s)", tc.args, code, tc.code, out.String(), errb.String())
		}
	}
}
