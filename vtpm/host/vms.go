package host

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"regexp"
	"sort"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/internal/atomicfile"
	"github.com/vtpmm/vtpmm/internal/ids"
	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/swtpm"
)

// VM is a VM's record on this host. It holds no key material.
type VM struct {
	Name    string    `json:"name"`
	UUID    string    `json:"uuid"`
	Created time.Time `json:"created"`
}

// VMStatus is a VM with its key generation and whether its vTPM runs here.
type VMStatus struct {
	VM
	Generation uint64
	Running    bool
	SocketURI  string // vtpm.Open URI of the running vTPM's TPM channel
	CtrlSocket string
}

var vmNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)

// CreateVM creates a vTPM for a VM: a fresh VM key in the key store, and an
// swtpm state manufactured with EK certificates and encrypted under that
// key, exactly as libvirt will later open it. uuid may be empty.
func (h *Host) CreateVM(ctx context.Context, name, uuid string) (VM, error) {
	if !vmNameRE.MatchString(name) {
		return VM{}, fmt.Errorf("create VM: %w: name %q (letters, digits, . _ -; at most 64)", ErrConfig, name)
	}
	if uuid == "" {
		var err error
		if uuid, err = ids.NewUUID(h.opts.Rand); err != nil {
			return VM{}, err
		}
	}
	if err := vtpm.CheckVMID(uuid); err != nil {
		return VM{}, fmt.Errorf("create VM %s: %w", name, err)
	}
	if _, err := h.FindVM(name); err == nil {
		return VM{}, fmt.Errorf("create VM %s: %w", name, ErrVMExists)
	}
	if _, err := os.Stat(h.layout.VM(uuid)); err == nil {
		return VM{}, fmt.Errorf("create VM %s: %w: UUID %s", name, ErrVMExists, uuid)
	}
	log := h.log.WithFields(logrus.Fields{"vm": name, "vm_uuid": uuid})
	start := time.Now()
	key, gen, err := h.keys.Create(ctx, uuid)
	if err != nil {
		return VM{}, fmt.Errorf("create VM %s: %w", name, err)
	}
	defer key.Destroy()
	if err := os.MkdirAll(h.layout.VM(uuid), 0o700); err != nil {
		return VM{}, err
	}
	err = key.WithPassphrase(func(pass []byte) error {
		return swtpm.Setup(ctx, swtpm.SetupConfig{
			StateDir: h.layout.VMState(uuid), VMID: uuid, VMName: name, Passphrase: pass, CADir: h.layout.SwtpmCA(), Log: log,
		})
	})
	if err != nil {
		_ = h.keys.Delete(ctx, uuid)
		_ = os.RemoveAll(h.layout.VM(uuid))
		return VM{}, fmt.Errorf("create VM %s: %w", name, err)
	}
	vm := VM{Name: name, UUID: uuid, Created: h.opts.Now().UTC()}
	b, _ := json.Marshal(vm)
	if err := atomicfile.WriteFile(h.layout.VMRecord(uuid), b, 0o600); err != nil {
		return VM{}, err
	}
	log.WithFields(logrus.Fields{"generation": gen, "took_ms": time.Since(start).Milliseconds()}).Info("vTPM created")
	return vm, nil
}

// ListVMs returns this host's VMs, sorted by name.
func (h *Host) ListVMs(ctx context.Context) ([]VMStatus, error) {
	ents, err := os.ReadDir(h.layout.VMs())
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	gens := h.generations(ctx)
	var out []VMStatus
	for _, e := range ents {
		if vtpm.CheckVMID(e.Name()) != nil {
			continue
		}
		vm, err := h.readVM(e.Name())
		if err != nil {
			return nil, err
		}
		out = append(out, h.status(vm, gens[vm.UUID]))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// generations reads every VM's key generation once (no key is opened).
func (h *Host) generations(ctx context.Context) map[string]uint64 {
	out := map[string]uint64{}
	if infos, err := h.keys.List(ctx); err == nil {
		for _, k := range infos {
			out[k.VMID] = k.Generation
		}
	}
	return out
}

func (h *Host) status(vm VM, gen uint64) VMStatus {
	st := VMStatus{VM: vm, Generation: gen}
	h.mu.Lock()
	if p, ok := h.procs[vm.UUID]; ok {
		st.Running, st.SocketURI, st.CtrlSocket = true, p.proc.DataURI(), p.proc.CtrlSocket()
	}
	h.mu.Unlock()
	return st
}

func (h *Host) readVM(id string) (VM, error) {
	b, err := os.ReadFile(h.layout.VMRecord(id))
	if err != nil {
		return VM{}, fmt.Errorf("read VM %s: %w", id, err)
	}
	var vm VM
	if err := json.Unmarshal(b, &vm); err != nil || vm.UUID != id {
		return VM{}, fmt.Errorf("read VM %s: %w: vm.json", id, vtpm.ErrCorrupt)
	}
	return vm, nil
}

// FindVM finds a VM by name or UUID.
func (h *Host) FindVM(ref string) (VM, error) {
	if vtpm.CheckVMID(ref) == nil {
		if vm, err := h.readVM(ref); err == nil {
			return vm, nil
		}
	}
	ents, _ := os.ReadDir(h.layout.VMs())
	for _, e := range ents {
		if vm, err := h.readVM(e.Name()); err == nil && vm.Name == ref {
			return vm, nil
		}
	}
	return VM{}, fmt.Errorf("%w: %q", ErrVMNotFound, ref)
}

// vmProcess is a vTPM this host runs (for tests and demos; under libvirt,
// libvirt runs swtpm with the same key and state).
type vmProcess struct {
	vm   VM
	proc *swtpm.Process
}

func (p *vmProcess) stop(ctx context.Context) error { return p.proc.Stop(ctx) }

// StartVM starts a VM's vTPM: it opens the VM key (no TPM command) and
// starts swtpm on the encrypted state with the key as --key and
// --migration-key passphrase.
func (h *Host) StartVM(ctx context.Context, ref string) (VMStatus, error) {
	vm, err := h.FindVM(ref)
	if err != nil {
		return VMStatus{}, fmt.Errorf("start vTPM: %w", err)
	}
	h.mu.Lock()
	if h.closed {
		h.mu.Unlock()
		return VMStatus{}, ErrClosed
	}
	if _, ok := h.procs[vm.UUID]; ok {
		h.mu.Unlock()
		return VMStatus{}, fmt.Errorf("start vTPM %s: %w", vm.Name, ErrVMRunning)
	}
	h.mu.Unlock()
	sockDir := h.layout.VMSockets(vm.UUID)
	if err := os.MkdirAll(sockDir, 0o700); err != nil {
		return VMStatus{}, fmt.Errorf("start vTPM %s: %w", vm.Name, err)
	}
	log := h.log.WithFields(logrus.Fields{"vm": vm.Name, "vm_uuid": vm.UUID})
	var proc *swtpm.Process
	gen, err := h.keys.WithPassphrase(ctx, vm.UUID, func(pass []byte) error {
		var err error
		proc, err = swtpm.Start(ctx, swtpm.ProcessConfig{
			StateDir: h.layout.VMState(vm.UUID), Passphrase: pass, SocketDir: sockDir, Log: log,
		})
		return err
	})
	if err != nil {
		return VMStatus{}, fmt.Errorf("start vTPM %s: %w", vm.Name, err)
	}
	log = log.WithField("generation", gen)
	if err := proc.Init(ctx); err != nil {
		_ = proc.Stop(ctx)
		return VMStatus{}, fmt.Errorf("start vTPM %s: %w", vm.Name, err)
	}
	h.mu.Lock()
	h.procs[vm.UUID] = &vmProcess{vm: vm, proc: proc}
	h.mu.Unlock()
	log.WithField("socket", proc.DataURI()).Info("vTPM started")
	return h.status(vm, gen), nil
}

// StopVM stops a VM's vTPM, saving its state.
func (h *Host) StopVM(ctx context.Context, ref string) error {
	vm, err := h.FindVM(ref)
	if err != nil {
		return fmt.Errorf("stop vTPM: %w", err)
	}
	h.mu.Lock()
	p, ok := h.procs[vm.UUID]
	delete(h.procs, vm.UUID)
	h.mu.Unlock()
	if !ok {
		return fmt.Errorf("stop vTPM %s: %w", vm.Name, ErrVMNotRunning)
	}
	if err := p.stop(ctx); err != nil {
		return fmt.Errorf("stop vTPM %s: %w", vm.Name, err)
	}
	h.log.WithFields(logrus.Fields{"vm": vm.Name, "vm_uuid": vm.UUID}).Info("vTPM stopped")
	return nil
}

// StartAll starts the vTPM of every VM this host has a record and a key
// for, with its own swtpm (hosts without a hypervisor: tests and demos).
func (h *Host) StartAll(ctx context.Context) ([]VMStatus, error) {
	vms, err := h.ListVMs(ctx)
	if err != nil {
		return nil, err
	}
	for _, vm := range vms {
		if _, err := h.StartVM(ctx, vm.UUID); err != nil {
			return nil, err
		}
	}
	return h.ListVMs(ctx)
}
