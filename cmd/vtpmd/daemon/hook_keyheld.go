package daemon

import (
	"context"
	"fmt"

	"github.com/vtpmm/vtpmm/migrate"
)

// notKeyHeld is the hook's refusal of a start whose vTPM key this host
// does not hold (rule key-held): a copy of a VM that moved away, that was
// restored elsewhere, or that this host held under a TPM since replaced
// (its new vault holds no key for it). With a fleet registry it names the
// owner and generation the registry records, when it knows the VM.
func (d *Daemon) notKeyHeld(ctx context.Context, name, uuid string) error {
	advice := fmt.Sprintf("start it on the host that owns it ('vtpmctl vm show %s' there) or move it here with 'vtpmctl migrate'", name)
	if d.reg != nil {
		v, err := d.reg.VMs(ctx, uuid)
		if err != nil {
			v = d.reg.Cached(uuid)
		}
		if rec, ok := v.VMs[uuid]; ok {
			if rec.Owner == d.cfg.HostID {
				advice = fmt.Sprintf("the registry records %s as its owner at generation %d, so its key was lost with this host's TPM or data: "+
					"restore it from its newest bundle (vtpmctl restore BUNDLE --to %s --force)", d.cfg.HostID, rec.Generation, d.cfg.HostID)
			} else {
				advice = fmt.Sprintf("the registry records %s as its owner at generation %d: start it there or move it here with 'vtpmctl migrate'", rec.Owner, rec.Generation)
			}
		}
	}
	return fmt.Errorf("%w: VM %s (%s): %s holds no key for its vTPM (rule key-held); %s", migrate.ErrNotOwner, name, uuid, d.cfg.HostID, advice)
}
