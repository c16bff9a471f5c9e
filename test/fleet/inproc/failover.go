package inproc

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"sync"

	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/internal/guestseal"
	"github.com/vtpmm/vtpmm/test/fleet"
)

// The in-process fleet's parts for failover tests (issue 15): a fence
// agent that powers a host off as a lab's does (its running domains
// destroyed, its vtpmd killed), and a tenant that seals a new secret.

// fences counts the fence agent's runs per host.
type fences struct {
	mu sync.Mutex
	n  map[string]int
}

// Fence is the fleet's fence agent (Config.FenceAgent): it powers host
// off: every running domain of its hypervisor is destroyed and its vtpmd
// killed (if it runs). Exit 0 in Pacemaker's terms: it returns nil.
func (f *Fleet) Fence(ctx context.Context, host string) error {
	h, ok := f.hosts[host]
	if !ok {
		return fmt.Errorf("inproc: fence: no host %s", host)
	}
	f.fenced.mu.Lock()
	if f.fenced.n == nil {
		f.fenced.n = map[string]int{}
	}
	f.fenced.n[host]++
	f.fenced.mu.Unlock()
	h.life.Lock()
	defer h.life.Unlock()
	// A fence agent power-cycles the host: its VMs stop, and libvirt
	// forgets the VMs' (ephemeral) secrets (make soak seed 7020).
	if err := h.hyp.PowerCycle(ctx); err != nil {
		return fmt.Errorf("inproc: fence %s: %w", host, err)
	}
	if h.Up() {
		if err := h.kill(ctx); err != nil {
			return err
		}
	}
	if after := f.AfterFence; after != nil {
		h.life.Unlock()
		defer h.life.Lock()
		after(ctx, host)
	}
	return nil
}

// Up reports whether h's vtpmd runs (started, and not killed or crashed).
func (h *Host) Up() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.d != nil && h.closed == nil && !h.dying.Load() && !h.restarting.Load()
}

// CutRegistry cuts h's running vtpmd off the fleet registry, as a network
// partition does: its registry client stops (its embedded member with it)
// and its liveness lease is left to expire; the daemon and its VMs keep
// running. Only a Kill and Restart heal it.
func (h *Host) CutRegistry() error {
	d := h.daemon()
	if d == nil || d.RegistryClient() == nil {
		return fmt.Errorf("inproc: %s has no registry client", h.name)
	}
	d.RegistryClient().Abandon()
	return d.RegistryClient().Close()
}

// Fenced reports how often the fence agent ran for host.
func (f *Fleet) Fenced(host string) int {
	f.fenced.mu.Lock()
	defer f.fenced.mu.Unlock()
	return f.fenced.n[host]
}

// TenantReseal has the VM's tenant seal a new random secret in its vTPM
// here (its vTPM state changes) and returns it.
func (h *Host) TenantReseal(ctx context.Context, vm fleet.VM) (string, error) {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	secret := "tenant-" + hex.EncodeToString(b)
	err := h.withVTPM(ctx, vm.UUID, func(tpm transport.TPM) error { return guestseal.Seal(ctx, tpm, []byte(secret), []int{16}) })
	return secret, err
}

// Running reports whether the VM runs on h's hypervisor.
func (h *Host) Running(ctx context.Context, vm fleet.VM) bool {
	d, err := h.hyp.Domain(ctx, vm.UUID)
	return err == nil && d.State == hypervisor.StateRunning
}
