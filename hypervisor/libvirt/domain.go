package libvirt

import (
	"cmp"
	"context"
	"fmt"
	"path/filepath"
	"slices"
	"strings"

	golibvirt "libvirt.org/go/libvirt"
	"libvirt.org/go/libvirtxml"

	"github.com/vtpmm/vtpmm/hypervisor"
)

// state maps a libvirt domain state onto hypervisor.State.
func state(s golibvirt.DomainState) hypervisor.State {
	switch s {
	case golibvirt.DOMAIN_RUNNING, golibvirt.DOMAIN_BLOCKED:
		return hypervisor.StateRunning
	case golibvirt.DOMAIN_PAUSED, golibvirt.DOMAIN_PMSUSPENDED:
		return hypervisor.StatePaused
	default: // SHUTOFF, SHUTDOWN, CRASHED, NOSTATE
		return hypervisor.StateShutoff
	}
}

// emulatorTPM returns the domain's emulator vTPM backend, or nil.
func emulatorTPM(doc string) (*libvirtxml.DomainTPMBackendEmulator, error) {
	var d libvirtxml.Domain
	if err := d.Unmarshal(doc); err != nil {
		return nil, fmt.Errorf("parse domain XML: %w", err)
	}
	if d.Devices == nil {
		return nil, nil
	}
	for _, t := range d.Devices.TPMs {
		if t.Backend != nil && t.Backend.Emulator != nil {
			return t.Backend.Emulator, nil
		}
	}
	return nil, nil
}

func describe(d *golibvirt.Domain) (hypervisor.Domain, error) {
	id, err := d.GetUUIDString()
	if err != nil {
		return hypervisor.Domain{}, wrapLibvirt(err)
	}
	name, err := d.GetName()
	if err != nil {
		return hypervisor.Domain{}, wrapLibvirt(err)
	}
	st, _, err := d.GetState()
	if err != nil {
		return hypervisor.Domain{}, wrapLibvirt(err)
	}
	return hypervisor.Domain{UUID: id, Name: name, State: state(st)}, nil
}

// lookup finds a domain by UUID; ErrNoDomain when it is not defined.
func lookup(c *golibvirt.Connect, vmUUID string) (*golibvirt.Domain, error) {
	d, err := c.LookupDomainByUUIDString(vmUUID)
	if isCode(err, golibvirt.ERR_NO_DOMAIN) {
		return nil, hypervisor.ErrNoDomain
	}
	if err != nil {
		return nil, wrapLibvirt(err)
	}
	return d, nil
}

// SwtpmStateRoot is where libvirt 9.0 keeps a domain's emulated TPM state
// (swtpm's --tpmstate), per domain UUID; TPM 2.0 state is in its tpm2/.
const SwtpmStateRoot = "/var/lib/libvirt/swtpm"

// VTPMStateDir returns the directory of a domain's TPM 2.0 emulator state
// (SwtpmStateRoot/UUID/tpm2), for a key rotation while it is shut off. A
// domain without an emulator TPM is ErrNoDomain's kin (no vTPM); one with a
// managed save image is ErrManagedSave (the image holds vTPM blobs under
// the current key).
func (h *Hypervisor) VTPMStateDir(ctx context.Context, vmUUID string) (string, error) {
	err := h.with(ctx, func(c *golibvirt.Connect) error {
		d, err := lookup(c, vmUUID)
		if err != nil {
			return err
		}
		defer d.Free()
		doc, err := d.GetXMLDesc(golibvirt.DOMAIN_XML_INACTIVE)
		if err != nil {
			return wrapLibvirt(err)
		}
		tpm, err := emulatorTPM(doc)
		if err != nil {
			return err
		}
		if tpm == nil {
			return fmt.Errorf("%w: the domain has no emulated TPM", hypervisor.ErrNoDomain)
		}
		saved, err := d.HasManagedSaveImage(0)
		if err != nil {
			return wrapLibvirt(err)
		}
		if saved {
			return hypervisor.ErrManagedSave
		}
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("vTPM state of %s on %s: %w", vmUUID, h.cfg.Name, err)
	}
	return filepath.Join(SwtpmStateRoot, strings.ToLower(vmUUID), "tpm2"), nil
}

// Domain reports a VM's state here (StateAbsent when it is not defined).
func (h *Hypervisor) Domain(ctx context.Context, vmUUID string) (hypervisor.Domain, error) {
	out := hypervisor.Domain{UUID: vmUUID, State: hypervisor.StateAbsent}
	err := h.with(ctx, func(c *golibvirt.Connect) error {
		d, err := lookup(c, vmUUID)
		if err == hypervisor.ErrNoDomain {
			return nil
		}
		if err != nil {
			return err
		}
		defer d.Free()
		out, err = describe(d)
		return err
	})
	if err != nil {
		return hypervisor.Domain{}, fmt.Errorf("domain %s on %s: %w", vmUUID, h.cfg.Name, err)
	}
	return out, nil
}

// Domains lists the domains with an emulator vTPM, sorted by name.
func (h *Hypervisor) Domains(ctx context.Context) ([]hypervisor.Domain, error) {
	var out []hypervisor.Domain
	err := h.with(ctx, func(c *golibvirt.Connect) error {
		doms, err := c.ListAllDomains(0)
		if err != nil {
			return wrapLibvirt(err)
		}
		defer func() {
			for i := range doms {
				doms[i].Free()
			}
		}()
		for i := range doms {
			doc, err := doms[i].GetXMLDesc(0)
			if isCode(err, golibvirt.ERR_NO_DOMAIN) {
				continue // went away meanwhile
			}
			if err != nil {
				return wrapLibvirt(err)
			}
			if tpm, err := emulatorTPM(doc); err != nil || tpm == nil {
				continue
			}
			d, err := describe(&doms[i])
			if err != nil {
				continue
			}
			out = append(out, d)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("domains on %s: %w", h.cfg.Name, err)
	}
	slices.SortFunc(out, func(a, b hypervisor.Domain) int {
		return cmp.Or(cmp.Compare(a.Name, b.Name), cmp.Compare(a.UUID, b.UUID))
	})
	return out, nil
}

// StartDomain cold-starts a defined domain. libvirt reads the vTPM secret
// now (and on the first start runs swtpm_setup to create the state). The
// start runs on a connection of its own (withOwn): it waits for the qemu
// hook, which may call this host's vtpmd, whose handler calls libvirt.
func (h *Hypervisor) StartDomain(ctx context.Context, vmUUID string) error {
	return h.domainOpOn(ctx, h.withOwn, "start", vmUUID, func(d *golibvirt.Domain) error {
		if err := d.Create(); err != nil {
			return classifyStart(err)
		}
		return nil
	})
}

// DestroyDomain stops a running domain at once (its vTPM state stays).
func (h *Hypervisor) DestroyDomain(ctx context.Context, vmUUID string) error {
	return h.domainOp(ctx, "destroy", vmUUID, func(d *golibvirt.Domain) error {
		err := d.Destroy()
		if isCode(err, golibvirt.ERR_OPERATION_INVALID) {
			return fmt.Errorf("%w: %w", hypervisor.ErrNotRunning, wrapLibvirt(err))
		}
		return err
	})
}

// UndefineDomain removes a domain's persistent definition. With
// removeTPMState, libvirt also deletes its vTPM state (VIR_DOMAIN_UNDEFINE_TPM).
func (h *Hypervisor) UndefineDomain(ctx context.Context, vmUUID string, removeTPMState bool) error {
	flags := golibvirt.DOMAIN_UNDEFINE_KEEP_TPM
	if removeTPMState {
		flags = golibvirt.DOMAIN_UNDEFINE_TPM
	}
	return h.domainOp(ctx, "undefine", vmUUID, func(d *golibvirt.Domain) error { return d.UndefineFlags(flags) })
}

func (h *Hypervisor) domainOp(ctx context.Context, op, vmUUID string, f func(d *golibvirt.Domain) error) error {
	return h.domainOpOn(ctx, h.with, op, vmUUID, f)
}

// domainOpOn runs f on the domain looked up through run's connection
// (with: the shared one; withOwn: one of its own).
func (h *Hypervisor) domainOpOn(ctx context.Context, run func(context.Context, func(*golibvirt.Connect) error) error,
	op, vmUUID string, f func(d *golibvirt.Domain) error) error {
	err := run(ctx, func(c *golibvirt.Connect) error {
		d, err := lookup(c, vmUUID)
		if err != nil {
			return err
		}
		defer d.Free()
		return wrapLibvirt(f(d))
	})
	if err != nil {
		return fmt.Errorf("%s domain %s on %s: %w", op, vmUUID, h.cfg.Name, err)
	}
	h.log.WithField("vm", vmUUID).Debugf("domain %s", op)
	return nil
}

// classifyStart maps libvirt's cold-start failures of a vTPM domain.
func classifyStart(err error) error {
	le, ok := libvirtError(err)
	if !ok {
		return err
	}
	switch {
	case le.Code == golibvirt.ERR_NO_SECRET || containsAny(le.Message, "Secret not found", "no secret with matching"):
		return fmt.Errorf("%w: %w", hypervisor.ErrSecretMissing, wrapLibvirt(err))
	case containsAny(le.Message, "decryption error", "Could not initialize libtpms", "swtpm"):
		return fmt.Errorf("%w: %w", hypervisor.ErrSecretMismatch, wrapLibvirt(err))
	}
	return wrapLibvirt(err)
}
