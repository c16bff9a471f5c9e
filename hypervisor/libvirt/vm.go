package libvirt

import (
	"context"
	"fmt"
	"strings"

	golibvirt "libvirt.org/go/libvirt"
	"libvirt.org/go/libvirtxml"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/internal/ids"
)

// VMSpec describes a VM with an encrypted emulator vTPM for DefineVM.
type VMSpec struct {
	Name      string
	UUID      string
	MemoryMiB uint // default 128
	VCPUs     uint // default 1
	// TCG runs the VM under QEMU's emulator (<domain type='qemu'>) instead
	// of KVM; needed for Linux guests under nested KVM.
	TCG bool
	// Kernel, Initrd and Cmdline boot a kernel directly; empty Kernel gives
	// a firmware-only (SeaBIOS, diskless) VM.
	Kernel, Initrd, Cmdline string
	// SerialLog, if set, sends the serial console to this file (a path as
	// the host's libvirtd sees it); otherwise a pty.
	SerialLog string
	// TPMVersion is "2.0" (default, tpm-crb) or "1.2" (tpm-tis).
	TPMVersion string
	// SecretUUID is the secret the vTPM state is encrypted with; default
	// hypervisor.SecretUUID(UUID), the one DefineSecret defines.
	SecretUUID string
	// Start cold-starts the VM after defining it.
	Start bool
}

// DomainXML renders the spec as libvirt domain XML.
func (s VMSpec) DomainXML() (string, error) {
	if s.Name == "" || !ids.IsUUID(s.UUID) {
		return "", fmt.Errorf("%w: VM name and canonical UUID required", ErrBadConfig)
	}
	mem, cpus := s.MemoryMiB, s.VCPUs
	if mem == 0 {
		mem = 128
	}
	if cpus == 0 {
		cpus = 1
	}
	version, model := s.TPMVersion, "tpm-crb"
	switch version {
	case "", "2.0":
		version = "2.0"
	case "1.2":
		model = "tpm-tis"
	default:
		return "", fmt.Errorf("%w: TPM version %q (want 2.0 or 1.2)", ErrBadConfig, version)
	}
	secret := s.SecretUUID
	if secret == "" {
		secret = hypervisor.SecretUUID(s.UUID)
	}
	typ := "kvm"
	if s.TCG {
		typ = "qemu"
	}
	serial := libvirtxml.DomainSerial{Source: &libvirtxml.DomainChardevSource{Pty: &libvirtxml.DomainChardevSourcePty{}},
		Target: &libvirtxml.DomainSerialTarget{Port: new(uint)}}
	if s.SerialLog != "" {
		serial.Source = &libvirtxml.DomainChardevSource{File: &libvirtxml.DomainChardevSourceFile{Path: s.SerialLog, Append: "on"}}
	}
	d := libvirtxml.Domain{
		Type: typ, Name: s.Name, UUID: s.UUID,
		Memory: &libvirtxml.DomainMemory{Value: mem, Unit: "MiB"},
		VCPU:   &libvirtxml.DomainVCPU{Value: cpus},
		OS: &libvirtxml.DomainOS{Type: &libvirtxml.DomainOSType{Arch: "x86_64", Machine: "q35", Type: "hvm"},
			Kernel: s.Kernel, Initrd: s.Initrd, Cmdline: s.Cmdline},
		Features:   &libvirtxml.DomainFeatureList{ACPI: &libvirtxml.DomainFeature{}},
		Clock:      &libvirtxml.DomainClock{Offset: "utc"},
		OnPoweroff: "destroy", OnReboot: "restart", OnCrash: "destroy",
		Devices: &libvirtxml.DomainDeviceList{
			Emulator: "/usr/bin/qemu-system-x86_64",
			Serials:  []libvirtxml.DomainSerial{serial},
			TPMs: []libvirtxml.DomainTPM{{Model: model, Backend: &libvirtxml.DomainTPMBackend{
				Emulator: &libvirtxml.DomainTPMBackendEmulator{Version: version,
					Encryption: &libvirtxml.DomainTPMBackendEncryption{Secret: secret}}}}},
			MemBalloon: &libvirtxml.DomainMemBalloon{Model: "none"},
		},
	}
	return d.Marshal()
}

// DefineVM defines a persistent VM from spec (and starts it if spec.Start).
// Its vTPM secret must be defined (DefineSecret) before it starts; on the
// first start libvirt creates the encrypted vTPM state with swtpm_setup.
func (h *Hypervisor) DefineVM(ctx context.Context, spec VMSpec) error {
	op := fmt.Sprintf("define VM %s (%s) on %s", spec.UUID, spec.Name, h.cfg.Name)
	doc, err := spec.DomainXML()
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	err = h.with(ctx, func(c *golibvirt.Connect) error {
		if d, err := c.LookupDomainByUUIDString(spec.UUID); err == nil {
			d.Free()
			return hypervisor.ErrAlreadyExists
		}
		d, err := c.DomainDefineXML(doc)
		if err != nil {
			return wrapLibvirt(err)
		}
		d.Free()
		return nil
	})
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	if spec.Start {
		return h.StartDomain(ctx, spec.UUID)
	}
	return nil
}

// withSecret returns the domain XML with its emulator vTPM encrypted by
// secretUUID.
func withSecret(doc, secretUUID string) (string, error) {
	var d libvirtxml.Domain
	if err := d.Unmarshal(doc); err != nil {
		return "", fmt.Errorf("parse domain XML: %w", err)
	}
	if d.Devices != nil {
		for i := range d.Devices.TPMs {
			if b := d.Devices.TPMs[i].Backend; b != nil && b.Emulator != nil {
				b.Emulator.Encryption = &libvirtxml.DomainTPMBackendEncryption{Secret: secretUUID}
				return d.Marshal()
			}
		}
	}
	return "", ErrNoVTPM
}

func containsAny(s string, subs ...string) bool {
	for _, x := range subs {
		if strings.Contains(s, x) {
			return true
		}
	}
	return false
}
