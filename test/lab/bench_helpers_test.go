package lab_test

import (
	"reflect"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/test/lab"
)

func TestQEMUAccel(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"libvirt 9 tcg", []string{"/usr/bin/qemu-system-x86_64", "-name", "guest=vm", "-machine", "pc-q35-7.2,usb=off", "-accel", "tcg", "-cpu", "qemu64"}, "tcg"},
		{"libvirt 9 kvm", []string{"qemu", "-accel", "kvm", "-m", "128"}, "kvm"},
		{"options", []string{"qemu", "-accel", "tcg,thread=multi"}, "tcg"},
		{"machine option", []string{"qemu", "-machine", "q35,accel=kvm:tcg"}, "kvm"},
		{"none", []string{"qemu", "-m", "128"}, ""},
		{"dangling", []string{"qemu", "-accel"}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := lab.QEMUAccel(tc.args); got != tc.want {
				t.Errorf("QEMUAccel = %q, want %q", got, tc.want)
			}
		})
	}
}

func TestAccelString(t *testing.T) {
	for _, tc := range []struct {
		a    lab.Accel
		want string
	}{
		{lab.Accel{DomainType: "qemu", QEMU: "tcg"}, "tcg"},
		{lab.Accel{DomainType: "kvm", QEMU: "kvm"}, "kvm"},
		{lab.Accel{DomainType: "kvm", QEMU: "tcg"}, `domain type "kvm", QEMU accel "tcg"`},
	} {
		if got := tc.a.String(); got != tc.want {
			t.Errorf("%+v: %q, want %q", tc.a, got, tc.want)
		}
	}
}

func TestParseMetrics(t *testing.T) {
	const text = `# HELP vtpmm_tpm_commands_total Commands sent to the host TPM, by command name.
# TYPE vtpmm_tpm_commands_total counter
vtpmm_tpm_commands_total{command="FlushContext"} 3
vtpmm_tpm_commands_total{command="Load"} 2
vtpmm_migration_phase_seconds_sum{phase="attest"} 0.25
vtpmm_migration_phase_seconds_count{phase="attest"} 2
process_open_fds 12
`
	m, err := lab.ParseMetrics(text)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := m.TPMCommands(), map[string]int{"FlushContext": 3, "Load": 2}; !reflect.DeepEqual(got, want) {
		t.Errorf("TPMCommands = %v, want %v", got, want)
	}
	if got := m.Family("vtpmm_migration_phase_seconds_sum", "phase")["attest"]; got != 0.25 {
		t.Errorf("attest sum = %v", got)
	}
	if m["process_open_fds"] != 12 {
		t.Errorf("process_open_fds = %v", m["process_open_fds"])
	}
	if _, err := lab.ParseMetrics("broken_line_without_value\n"); err == nil {
		t.Error("a line without a value parsed")
	}
}

func TestParseHookRuns(t *testing.T) {
	const log = `2026-12-06 20:38:39.055+0000: 27081: debug : qemuMigrationDstPrepareFresh:3266 : name=vm-hook, origname=<null>
2026-12-06 20:38:39.059+0000: 27081: debug : virCommandRunAsync:2607 : About to run LC_ALL=C PATH=/usr/bin HOME=/root /etc/libvirt/hooks/qemu.d/vtpmm vm-hook migrate begin -
2026-12-06 20:38:39.100+0000: 27090: debug : virCommandRunAsync:2607 : About to run /usr/bin/swtpm socket --tpm2
2026-12-06 20:38:39.120+0000: 27090: debug : virCommandRun:2453 : Result exit status 0, stdout: '' stderr: ''
2026-12-06 20:38:39.226+0000: 27081: debug : virCommandRun:2453 : Result status 0, stdout: '' stderr: 'vtpmm: vTPM key of VM vm-hook pulled
  <name>vm-hook</name>
2026-12-06 20:38:39.228+0000: 27081: debug : virCommandRunAsync:2607 : About to run LC_ALL=C HOME=/root /etc/libvirt/hooks/qemu.d/vtpmm vm-hook prepare begin -
`
	runs := lab.ParseHookRuns(log)
	if len(runs) != 2 {
		t.Fatalf("runs = %+v, want 2", runs)
	}
	if r := runs[0]; r.Domain != "vm-hook" || r.Event != "migrate begin" || r.Took != 167*time.Millisecond {
		t.Errorf("first run = %+v", r)
	}
	if r := runs[1]; r.Event != "prepare begin" || r.Took != -1 {
		t.Errorf("unfinished run = %+v, want Took -1", r)
	}
}
