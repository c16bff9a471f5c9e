package lab

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/hypervisor/libvirt"
	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/test/fleet"
	"github.com/vtpmm/vtpmm/test/guest"
)

// Contract returns the lab fleet as the test fleet contract (test/fleet),
// so that the migration scenarios written once run on real libvirt too.
// With img, every VM is the Linux guest, whose tenant seals a secret in its
// vTPM and unseals it every second on its console (TenantSecret reads it);
// without, VMs are firmware-only and TenantSecret says fleet.ErrNoTenant.
// The fleet's daemons must be running (Start).
func (f *Fleet) Contract(img *guest.Image) fleet.Fleet {
	return &contractFleet{f: f, img: img, vms: map[string]*VM{}}
}

type contractFleet struct {
	f   *Fleet
	img *guest.Image

	mu  sync.Mutex
	vms map[string]*VM // by UUID
}

type contractHost struct {
	c *contractFleet
	h *FleetHost
}

var (
	_ fleet.Fleet = (*contractFleet)(nil)
	_ fleet.Host  = (*contractHost)(nil)
)

func (c *contractFleet) Kind() string   { return "lab" }
func (c *contractFleet) HookMode() bool { return c.f.cfg.HookMode }

func (c *contractFleet) Host(name string) fleet.Host {
	h, ok := c.f.Hosts[name]
	if !ok {
		return nil
	}
	return &contractHost{c: c, h: h}
}

func (c *contractFleet) HostNames() []string {
	out := append([]string(nil), c.f.Order...)
	sort.Strings(out)
	return out
}

// CreateVM stops host's vtpmd (the lab creates a VM the way an operator
// does before the daemon runs: 'vtpmd vm create' holds the host TPM),
// creates and starts the VM (CreateVM) and starts vtpmd again.
func (c *contractFleet) CreateVM(ctx context.Context, host, name string) (fleet.VM, error) {
	h, ok := c.f.Hosts[host]
	if !ok {
		return fleet.VM{}, fmt.Errorf("lab: no host %s", host)
	}
	if err := h.Vtpmd.Stop(); err != nil {
		return fleet.VM{}, err
	}
	spec := libvirt.VMSpec{TCG: !KVM()}
	if c.img != nil {
		spec = LinuxSpec(c.img)
	}
	vm := c.f.CreateVM(ctx, h, name, spec)
	if err := h.Vtpmd.Start(ctx); err != nil {
		return fleet.VM{}, err
	}
	c.mu.Lock()
	c.vms[vm.UUID] = vm
	c.mu.Unlock()
	return fleet.VM{Name: vm.Name, UUID: vm.UUID}, nil
}

// RemoveVM destroys and undefines the VM (and its vTPM state) wherever
// libvirt knows it.
func (c *contractFleet) RemoveVM(ctx context.Context, vm fleet.VM) error {
	var errs []error
	for _, name := range c.f.Order {
		h := c.f.Hosts[name]
		d, err := h.Hyp.Domain(ctx, vm.UUID)
		if err != nil || d.State == hypervisor.StateAbsent {
			continue
		}
		if d.State == hypervisor.StateRunning {
			errs = append(errs, h.Hyp.DestroyDomain(ctx, vm.UUID))
		}
		errs = append(errs, h.Hyp.UndefineDomain(ctx, vm.UUID, true))
	}
	return errors.Join(errs...)
}

func (h *contractHost) Name() string                      { return h.h.Name }
func (h *contractHost) Admin() *adminapi.Client           { return adminapi.NewClient(h.h.Vtpmd.Socket) }
func (h *contractHost) Hypervisor() hypervisor.Hypervisor { return h.h.Hyp }

// PlainMigrate runs 'virsh migrate --live --p2p --persistent
// --undefinesource VM qemu+tcp://DST/system' in the host's namespaces.
func (h *contractHost) PlainMigrate(ctx context.Context, vm fleet.VM, to string) error {
	dst, ok := h.c.f.Hosts[to]
	if !ok {
		return fmt.Errorf("lab: no host %s", to)
	}
	out, _, err := h.h.Virsh(ctx, "migrate", "--live", "--p2p", "--persistent", "--undefinesource", vm.Name, "qemu+tcp://"+dst.IP+"/system")
	if err != nil {
		return fmt.Errorf("virsh migrate %s to %s: %w: %s", vm.Name, to, err, out)
	}
	return nil
}

// Kill SIGKILLs the host's vtpmd.
func (h *contractHost) Kill(context.Context) error { return h.h.Vtpmd.Kill() }

// Restart starts vtpmd again 2 s later, as vtpmd.service does
// (Restart=on-failure, RestartSec=2s).
func (h *contractHost) Restart(ctx context.Context) error {
	select {
	case <-time.After(2 * time.Second):
	case <-ctx.Done():
		return ctx.Err()
	}
	return h.h.Vtpmd.Start(ctx)
}

// TenantSecret waits for two more unseal ticks of the guest on this host's
// console and returns the secret the guest's whole console history shows
// (one boot, one secret, every tick unsealed it with PCR 16 unchanged).
func (h *contractHost) TenantSecret(ctx context.Context, vm fleet.VM) (string, error) {
	if h.c.img == nil {
		return "", fleet.ErrNoTenant
	}
	h.c.mu.Lock()
	v, ok := h.c.vms[vm.UUID]
	h.c.mu.Unlock()
	if !ok {
		return "", fmt.Errorf("lab: unknown VM %s", vm.Name)
	}
	_, per := h.c.f.Console(v)
	h.c.f.WaitTicks(ctx, v, h.h.Name, len(per[h.h.Name].Ticks), 2, 3*time.Minute)
	return h.c.f.VerifyConsole(v, 2), nil
}
