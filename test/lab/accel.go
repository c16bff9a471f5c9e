package lab

import (
	"context"
	"encoding/xml"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// Accel is the accelerator a running VM actually uses, read from two
// places: the domain XML libvirt runs (<domain type='kvm'> or 'qemu') and
// the accelerator on the QEMU process' command line (-accel kvm or tcg,
// or -machine ...,accel=...).
type Accel struct {
	DomainType string `json:"domain_type"`
	QEMU       string `json:"qemu_accel"`
}

// String is "kvm" or "tcg" when both sources agree, else both.
func (a Accel) String() string {
	want := map[string]string{"kvm": "kvm", "qemu": "tcg"}[a.DomainType]
	if want != "" && want == a.QEMU {
		return a.QEMU
	}
	return fmt.Sprintf("domain type %q, QEMU accel %q", a.DomainType, a.QEMU)
}

// Accelerator reads the accelerator of the VM name running on h: its live
// domain XML (virsh dumpxml inside the host's namespaces) and the command
// line of its QEMU process (the pid file libvirt keeps under
// /run/libvirt/qemu).
func (h *Host) Accelerator(ctx context.Context, name string) (Accel, error) {
	var a Accel
	out, _, err := h.Virsh(ctx, "dumpxml", name)
	if err != nil {
		return a, fmt.Errorf("lab: virsh dumpxml %s on %s: %w: %s", name, h.Name, err, Tail(out, 500))
	}
	var dom struct {
		Type string `xml:"type,attr"`
	}
	if err := xml.Unmarshal([]byte(out), &dom); err != nil {
		return a, fmt.Errorf("lab: domain XML of %s on %s: %w", name, h.Name, err)
	}
	a.DomainType = dom.Type
	b, err := os.ReadFile(h.Path("/run/libvirt/qemu/" + name + ".pid"))
	if err != nil {
		return a, fmt.Errorf("lab: QEMU pid of %s on %s: %w", name, h.Name, err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return a, fmt.Errorf("lab: QEMU pid file of %s on %s: %w", name, h.Name, err)
	}
	cmdline, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return a, fmt.Errorf("lab: command line of QEMU %d (%s on %s): %w", pid, name, h.Name, err)
	}
	a.QEMU = QEMUAccel(strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00"))
	if a.QEMU == "" {
		return a, fmt.Errorf("lab: no accelerator on the command line of QEMU %d (%s on %s)", pid, name, h.Name)
	}
	return a, nil
}

// QEMUAccel returns the accelerator named on a QEMU command line
// ("-accel tcg", "-accel kvm,...", "-machine q35,accel=kvm"), or "".
func QEMUAccel(args []string) string {
	for i := 0; i+1 < len(args); i++ {
		switch args[i] {
		case "-accel":
			name, _, _ := strings.Cut(args[i+1], ",")
			return strings.TrimPrefix(name, "accel=")
		case "-machine", "-M":
			for _, kv := range strings.Split(args[i+1], ",") {
				if v, ok := strings.CutPrefix(kv, "accel="); ok {
					name, _, _ := strings.Cut(v, ":")
					return name
				}
			}
		}
	}
	return ""
}
