package daemon

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestFenceCommand: the fence agent's argv template ({host} replaced in
// every argument), Pacemaker's convention (exit 0 = fenced, anything else
// or a timeout = not fenced, with the agent's output in the error), and
// no agent without a command.
func TestFenceCommand(t *testing.T) {
	dir := t.TempDir()
	out := filepath.Join(dir, "fenced")
	tests := []struct {
		name    string
		argv    []string
		timeout string
		wantErr string
	}{
		{"exit 0 fences", []string{"/bin/sh", "-c", `echo "$1" > ` + out, "fence", "--host={host}"}, "", ""},
		{"exit 1 does not", []string{"/bin/sh", "-c", "echo no power switch for $1; exit 1", "fence", "{host}"}, "", "no power switch for host-a"},
		{"timeout does not", []string{"/bin/sh", "-c", "sleep 5"}, "100ms", "signal: killed"},
		{"missing program", []string{filepath.Join(dir, "nope"), "{host}"}, "", "no such file"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d := &Daemon{cfg: Config{Standby: StandbyConfig{Fence: FenceConfig{Command: tc.argv, Timeout: tc.timeout}}}, log: discard()}
			if err := d.cfg.Standby.validate(); err != nil {
				t.Fatal(err)
			}
			err := d.fenceFunc()(context.Background(), "host-a")
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("fence: %v", err)
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Fatalf("fence: %v, want an error with %q", err, tc.wantErr)
			}
		})
	}
	if b, err := os.ReadFile(out); err != nil || strings.TrimSpace(string(b)) != "--host=host-a" {
		t.Fatalf("the agent got %q (%v), want --host=host-a", b, err)
	}
	if (&Daemon{cfg: Config{}}).fenceFunc() != nil {
		t.Fatal("a fence agent without a command")
	}
}

// TestStandbyConfig: every field of the standby section is checked and
// named.
func TestStandbyConfig(t *testing.T) {
	for _, tc := range []struct {
		c    StandbyConfig
		want string
	}{
		{StandbyConfig{}, ""},
		{StandbyConfig{Count: 2, MaxLag: "10s", Failover: "manual", Fence: FenceConfig{Command: []string{"/bin/true"}, Timeout: "5s"}}, ""},
		{StandbyConfig{Count: -1}, "standby.count"},
		{StandbyConfig{Count: 9}, "standby.count"},
		{StandbyConfig{MaxLag: "soon"}, "standby.max_lag"},
		{StandbyConfig{MaxLag: "0s"}, "standby.max_lag"},
		{StandbyConfig{Failover: "sometimes"}, "standby.failover"},
		{StandbyConfig{Fence: FenceConfig{Command: []string{""}}}, "standby.fence.command"},
		{StandbyConfig{Fence: FenceConfig{Timeout: "-1s"}}, "standby.fence.timeout"},
	} {
		err := tc.c.validate()
		if tc.want == "" {
			if err != nil {
				t.Fatalf("%+v: %v", tc.c, err)
			}
			continue
		}
		if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), tc.want) {
			t.Fatalf("%+v: %v, want ErrConfig naming %s", tc.c, err, tc.want)
		}
	}
}
