package lab_test

import (
	"reflect"
	"testing"

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
