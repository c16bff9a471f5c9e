package libvirt

import (
	"context"
	"fmt"
	"strings"

	golibvirt "libvirt.org/go/libvirt"
	"libvirt.org/go/libvirtxml"

	"github.com/vtpmm/vtpmm/hypervisor"
)

// A standby where a VM's domain is not defined defines it at promotion
// from the description its owner sent with the replica (issue 15,
// docs/failover.md): MigratableDomainXML on the owner, DefineDomainXML on
// the standby.

// MigratableDomainXML describes a VM's persistent domain for another host
// (VIR_DOMAIN_XML_INACTIVE|SECURE|MIGRATABLE: the configuration, with what
// is only meaningful here left out).
func (h *Hypervisor) MigratableDomainXML(ctx context.Context, vmUUID string) (string, error) {
	var doc string
	err := h.with(ctx, func(c *golibvirt.Connect) error {
		d, err := lookup(c, vmUUID)
		if err != nil {
			return err
		}
		defer d.Free()
		doc, err = d.GetXMLDesc(golibvirt.DOMAIN_XML_INACTIVE | golibvirt.DOMAIN_XML_SECURE | golibvirt.DOMAIN_XML_MIGRATABLE)
		return wrapLibvirt(err)
	})
	if err != nil {
		return "", fmt.Errorf("describe domain %s on %s: %w", vmUUID, h.cfg.Name, err)
	}
	return doc, nil
}

// DefineDomainXML defines the VM's persistent domain from doc (shut off).
// doc must be the VM's (its UUID) and its vTPM vtpmm's: an emulator TPM
// encrypted with the VM's secret (ErrNoVTPM otherwise); a domain already
// defined with that UUID is hypervisor.ErrAlreadyExists.
func (h *Hypervisor) DefineDomainXML(ctx context.Context, vmUUID, doc string) error {
	op := fmt.Sprintf("define domain %s on %s", vmUUID, h.cfg.Name)
	var d libvirtxml.Domain
	if err := d.Unmarshal(doc); err != nil {
		return fmt.Errorf("%s: %w: parse domain XML: %w", op, ErrBadConfig, err)
	}
	if !strings.EqualFold(d.UUID, vmUUID) {
		return fmt.Errorf("%s: %w: the XML describes domain %q", op, ErrBadConfig, d.UUID)
	}
	tpm, err := emulatorTPM(doc)
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	if tpm == nil || tpm.Encryption == nil || !strings.EqualFold(tpm.Encryption.Secret, hypervisor.SecretUUID(vmUUID)) {
		return fmt.Errorf("%s: %w: not encrypted with the VM's secret", op, ErrNoVTPM)
	}
	err = h.with(ctx, func(c *golibvirt.Connect) error {
		if old, err := c.LookupDomainByUUIDString(vmUUID); err == nil {
			old.Free()
			return hypervisor.ErrAlreadyExists
		}
		nd, err := c.DomainDefineXML(doc)
		if err != nil {
			return wrapLibvirt(err)
		}
		nd.Free()
		return nil
	})
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	h.log.WithField("vm", vmUUID).Info("domain defined from its owner's description")
	return nil
}
