package inproc

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/google/go-tpm/tpm2/transport"
	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/cmd/vtpmd/daemon"
	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/hypervisor/fake"
	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/internal/guestseal"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/test/fleet"
	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/emuhost"
	"github.com/vtpmm/vtpmm/vtpm/host"
)

// start starts h's daemon (on lis, or binding its listen address) and
// waits until it is ready.
func (h *Host) start(ctx context.Context, lis net.Listener) error {
	var log logrus.FieldLogger
	if h.f.cfg.Log != nil {
		log = h.f.cfg.Log(h.name)
	}
	deps := daemon.Deps{
		Host: host.Options{Log: log}, Hypervisor: h.hyp, WireListener: lis,
		Target: func(name string) (hypervisor.Target, error) {
			t, ok := h.f.net.Host(name)
			if !ok {
				return hypervisor.Target{}, fmt.Errorf("no hypervisor host %s", name)
			}
			return t.Target(), nil
		},
		Crash: func(p migrate.CrashPoint) error {
			if h.dying.Load() {
				return fmt.Errorf("%w at %s (%s was killed)", migrate.ErrCrash, p, h.name)
			}
			if f := h.crash.Load(); f != nil {
				return (*f)(p)
			}
			return nil
		},
		EvacuationSettle: h.f.cfg.EvacuationSettle,
	}
	if h.f.cfg.FenceAgent {
		deps.Fence = h.f.Fence
	}
	d, err := daemon.Start(ctx, h.cfg, deps)
	if err != nil {
		return fmt.Errorf("inproc: start vtpmd on %s: %w", h.name, err)
	}
	h.mu.Lock()
	h.d = d
	h.mu.Unlock()
	select {
	case <-d.Ready():
		return nil
	case err := <-d.Err():
		return fmt.Errorf("inproc: vtpmd on %s: %w", h.name, err)
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (h *Host) daemon() *daemon.Daemon {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.d
}

// Name is the host's name.
func (h *Host) Name() string { return h.name }

// Admin is the host's admin API client.
func (h *Host) Admin() *adminapi.Client { return h.admin }

// Hypervisor is the host's fake hypervisor.
func (h *Host) Hypervisor() hypervisor.Hypervisor { return h.hyp }

// Fake is the host's fake hypervisor, with its test hooks.
func (h *Host) Fake() *fake.Host { return h.hyp }

// Daemon is the host's running daemon.
func (h *Host) Daemon() *daemon.Daemon { return h.daemon() }

// Config is the host's vtpmd configuration.
func (h *Host) Config() daemon.Config { return h.cfg }

// PlainMigrate migrates vm with the fake hypervisor alone.
func (h *Host) PlainMigrate(ctx context.Context, vm fleet.VM, to string) error {
	dst, ok := h.f.hosts[to]
	if !ok {
		return fmt.Errorf("inproc: no host %s", to)
	}
	return h.hyp.Migrate(ctx, vm.UUID, dst.hyp.Target())
}

// OnCrashPoint runs f at every crash point of the daemon's migration node
// (nil: none); an error f returns is the node's, as an injected crash.
// Tests use it to act at a precise step of a migration.
func (h *Host) OnCrashPoint(f func(migrate.CrashPoint) error) {
	if f == nil {
		h.crash.Store(nil)
		return
	}
	h.crash.Store(&f)
}

// Emu is the host's emulated host TPM.
func (h *Host) Emu() *emuhost.Host { return h.emu }

// Kill makes the daemon die: its migration node fails at its next crash
// point (as if the process had died there), and the daemon is closed in
// the background.
func (h *Host) Kill(ctx context.Context) error {
	h.life.Lock()
	defer h.life.Unlock()
	return h.kill(ctx)
}

// kill is Kill with h.life held.
func (h *Host) kill(ctx context.Context) error {
	d := h.daemon()
	if d == nil {
		return fmt.Errorf("inproc: vtpmd on %s is not running", h.name)
	}
	h.dying.Store(true)
	h.closed = make(chan error, 1)
	go func() { h.closed <- d.Close(context.Background()) }()
	return nil
}

// Stop kills the daemon and waits until it closed (WaitStopped). Restart
// starts it again.
func (h *Host) Stop(ctx context.Context) error {
	h.life.Lock()
	defer h.life.Unlock()
	if err := h.kill(ctx); err != nil {
		return err
	}
	return h.waitStopped(ctx)
}

// WaitStopped waits until a killed daemon closed: its files and TPM let
// go, its last audit mark written, so its data directory can be copied or
// replaced. It returns at once when no daemon is closing.
func (h *Host) WaitStopped(ctx context.Context) error {
	h.life.Lock()
	defer h.life.Unlock()
	return h.waitStopped(ctx)
}

// waitStopped is WaitStopped with h.life held.
func (h *Host) waitStopped(ctx context.Context) error {
	if h.closed == nil {
		return nil
	}
	select {
	case <-h.closed:
		h.closed = nil
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(time.Minute):
		return fmt.Errorf("inproc: vtpmd on %s did not stop", h.name)
	}
}

// Crash makes the daemon die as a host that lost power does for the
// fleet: like Kill, but its liveness lease is not revoked; it expires
// after the registry's TTL.
func (h *Host) Crash(ctx context.Context) error {
	h.life.Lock()
	defer h.life.Unlock()
	d := h.daemon()
	if d == nil {
		return fmt.Errorf("inproc: vtpmd on %s is not running", h.name)
	}
	h.dying.Store(true)
	h.closed = make(chan error, 1)
	go func() { h.closed <- d.Crash(context.Background()) }()
	return nil
}

// Restart waits for the killed daemon to be gone and starts a new one on
// the same configuration (it reconciles open transactions at start). A
// start that fails (vtpmd refused its data directory) may be retried with
// Restart.
func (h *Host) Restart(ctx context.Context) error {
	h.life.Lock()
	defer h.life.Unlock()
	if err := h.waitStopped(ctx); err != nil {
		return err
	}
	h.restarting.Store(true) // not Up until the new daemon is in place
	defer h.restarting.Store(false)
	h.dying.Store(false)
	return h.start(ctx, nil)
}

// TenantSecret unseals the tenant's secret from the VM's vTPM here.
func (h *Host) TenantSecret(ctx context.Context, vm fleet.VM) (string, error) {
	var out []byte
	err := h.withVTPM(ctx, vm.UUID, func(tpm transport.TPM) error {
		var err error
		out, err = guestseal.Unseal(ctx, tpm)
		return err
	})
	return string(out), err
}

func (h *Host) withVTPM(ctx context.Context, vm string, fn func(transport.TPM) error) error {
	uri, err := h.hyp.VTPMURI(vm)
	if err != nil {
		return err
	}
	tpm, err := vtpm.Open(ctx, uri)
	if err != nil {
		return err
	}
	defer tpm.Close()
	return fn(tpm)
}

// LoseTPM destroys the host as a disaster does: its daemon dies (its
// registry member and liveness lease with it) and its host TPM's state is
// wiped, so its vault, and every VM key sealed under it, is gone for good.
// The VMs it ran are gone too (their domains destroyed). The host does not
// come back with Restart: it would need 'vtpmd init' on a new TPM.
func (h *Host) LoseTPM(ctx context.Context) error {
	h.life.Lock()
	defer h.life.Unlock()
	if err := h.kill(ctx); err != nil {
		return err
	}
	if err := h.waitStopped(ctx); err != nil {
		return err
	}
	_ = h.hyp.PowerCycle(ctx) // the host goes down with its TPM
	if err := h.emu.Stop(ctx); err != nil {
		return err
	}
	// The TPM's state goes; its manufacturer's CA (outside the TPM) stays,
	// so that a replacement of the same make chains to it (ReplaceTPM).
	ents, err := os.ReadDir(h.emu.Dir())
	if err != nil {
		return err
	}
	for _, e := range ents {
		if e.Name() != "ca" {
			if err := os.RemoveAll(filepath.Join(h.emu.Dir(), e.Name())); err != nil {
				return err
			}
		}
	}
	h.mu.Lock()
	h.d = nil
	h.mu.Unlock()
	return nil
}
