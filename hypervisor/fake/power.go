package fake

import (
	"context"
	"errors"

	"github.com/vtpmm/vtpmm/hypervisor"
)

// PowerCycle is the host losing power and booting again, as a fence
// agent's power-off does: every running VM stops, a start in flight
// fails, and libvirtd, started again, has forgotten every secret (vtpmm
// defines them ephemeral). Domains stay defined, shut off. Without it a
// fake "fence" that only destroyed the running domains left the secrets,
// so a start admitted while vtpmd was down (the hook lets it go on)
// brought a fenced VM back (make soak seed 7020).
func (h *Host) PowerCycle(ctx context.Context) error {
	h.mu.Lock()
	h.epoch++
	for id, v := range h.secrets {
		clear(v)
		delete(h.secrets, id)
	}
	var running []string
	for id, d := range h.domains {
		if d.proc != nil {
			running = append(running, id)
		}
	}
	h.mu.Unlock()
	var errs []error
	for _, id := range running {
		if err := h.DestroyDomain(ctx, id); err != nil && !errors.Is(err, hypervisor.ErrNotRunning) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
