package lab

import (
	"fmt"
	"os"
)

// HookPath is where FleetConfig.HookMode installs vtpmm's qemu hook
// ('vtpmctl hook install'), as the host's libvirtd sees it.
const HookPath = "/etc/libvirt/hooks/qemu.d/vtpmm"

// SetHook turns the host's installed qemu hook on (mode 0755) or off
// (0644). libvirt decides at daemon start whether the qemu driver has
// hooks, but at every hook call it runs only the executable files of
// qemu.d; so a hook installed before libvirtd started (HookMode) can be
// switched per migration, and while it is off libvirt runs nothing (it
// only formats the domain XML it would have passed). The benchmark uses
// this to run hook mode and the methods without the hook on the same
// hosts.
func (h *Host) SetHook(on bool) error {
	mode := os.FileMode(0o644)
	if on {
		mode = 0o755
	}
	if err := os.Chmod(h.Path(HookPath), mode); err != nil {
		return fmt.Errorf("lab: switch the qemu hook of %s (installed with FleetConfig.HookMode?): %w", h.Name, err)
	}
	return nil
}
