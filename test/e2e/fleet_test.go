//go:build e2e

package e2e_test

import (
	"context"
	"testing"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/hypervisor/libvirt"
	"github.com/vtpmm/vtpmm/test/lab"
)

func logger(t *testing.T) logrus.FieldLogger {
	l := logrus.New()
	l.SetOutput(tWriter{t})
	l.SetLevel(logrus.InfoLevel)
	return l
}

type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) { w.t.Log(string(p)); return len(p), nil }

// newHost starts a lab host (libvirtd and a host TPM; no vtpmd) for the
// tests of libvirt's own behaviour.
func newHost(ctx context.Context, t *testing.T, n *lab.Network, name, ip string) *lab.Host {
	t.Helper()
	t0 := time.Now()
	h := lab.NewHost(ctx, t, lab.HostConfig{Network: n, Name: name, IP: ip, BootLog: goodLog, Log: logger(t)})
	t.Logf("host %s up in %v (libvirtd + host TPM)", name, time.Since(t0).Round(time.Millisecond))
	return h
}

// startVM defines a firmware-only 128 MiB domain with pass as its vTPM
// secret and starts it; libvirt creates its encrypted vTPM at the start.
func startVM(ctx context.Context, t *testing.T, h *lab.Host, id, name string, pass []byte) {
	t.Helper()
	if err := h.Hyp.DefineSecret(ctx, id, pass); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	if err := h.Hyp.DefineVM(ctx, libvirt.VMSpec{Name: name, UUID: id, TCG: !lab.KVM(), Start: true}); err != nil {
		t.Fatal(err)
	}
	t.Logf("VM %s defined and started on %s in %v (kvm=%v)", name, h.Name, time.Since(t0).Round(time.Millisecond), lab.KVM())
}

// wantState checks the VM's state on each host.
func wantState(ctx context.Context, t *testing.T, vm string, want map[*lab.Host]hypervisor.State) {
	t.Helper()
	for h, st := range want {
		d, err := h.Hyp.Domain(ctx, vm)
		if err != nil {
			t.Fatal(err)
		}
		if d.State != st {
			t.Errorf("VM %s on %s: state %s, want %s", vm, h.Name, d.State, st)
		}
	}
}
