package agent

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/internal/atomicfile"
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

func (a *Agent) vmsDir() string                { return filepath.Join(a.cfg.DataDir, "vms") }
func (a *Agent) vmDir(id string) string        { return filepath.Join(a.vmsDir(), id) }
func (a *Agent) vmStateDir(id string) string   { return filepath.Join(a.vmDir(id), "tpm2") }
func (a *Agent) vmRecordPath(id string) string { return filepath.Join(a.vmDir(id), "vm.json") }
func (a *Agent) caDir() string                 { return filepath.Join(a.cfg.DataDir, "swtpm-localca") }

// newUUID returns a random (version 4) UUID.
func newUUID() (string, error) {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", err
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16]), nil
}

// CreateVM creates a vTPM for a VM: a fresh VM key in the key store, and an
// swtpm state manufactured with EK certificates and encrypted under that
// key, exactly as libvirt will later open it. uuid may be empty.
func (a *Agent) CreateVM(ctx context.Context, name, uuid string) (VM, error) {
	if !vmNameRE.MatchString(name) {
		return VM{}, fmt.Errorf("create VM: %w: name %q (letters, digits, . _ -; at most 64)", ErrConfig, name)
	}
	if uuid == "" {
		var err error
		if uuid, err = newUUID(); err != nil {
			return VM{}, err
		}
	}
	if err := vtpm.CheckVMID(uuid); err != nil {
		return VM{}, fmt.Errorf("create VM %s: %w", name, err)
	}
	if _, err := a.findVM(name); err == nil {
		return VM{}, fmt.Errorf("create VM %s: %w", name, ErrVMExists)
	}
	if _, err := os.Stat(a.vmDir(uuid)); err == nil {
		return VM{}, fmt.Errorf("create VM %s: %w: UUID %s", name, ErrVMExists, uuid)
	}
	log := a.log.WithFields(logrus.Fields{"vm": name, "vm_uuid": uuid})
	start := time.Now()
	key, gen, err := a.keys.Create(ctx, uuid)
	if err != nil {
		return VM{}, fmt.Errorf("create VM %s: %w", name, err)
	}
	defer key.Destroy()
	pass := key.Passphrase()
	defer wipe(pass)
	if err := os.MkdirAll(a.vmDir(uuid), 0o700); err != nil {
		return VM{}, err
	}
	err = swtpm.Setup(ctx, swtpm.SetupConfig{
		StateDir: a.vmStateDir(uuid), VMID: uuid, VMName: name, Passphrase: pass, CADir: a.caDir(), Log: log,
	})
	if err != nil {
		_ = a.keys.Delete(ctx, uuid)
		_ = os.RemoveAll(a.vmDir(uuid))
		return VM{}, fmt.Errorf("create VM %s: %w", name, err)
	}
	vm := VM{Name: name, UUID: uuid, Created: a.opts.Now().UTC()}
	b, _ := json.Marshal(vm)
	if err := atomicfile.WriteFile(a.vmRecordPath(uuid), b, 0o600); err != nil {
		return VM{}, err
	}
	log.WithFields(logrus.Fields{"generation": gen, "took_ms": time.Since(start).Milliseconds()}).Info("vTPM created")
	return vm, nil
}

func wipe(b []byte) {
	for i := range b {
		b[i] = 0
	}
}

// ListVMs returns this host's VMs, sorted by name.
func (a *Agent) ListVMs(ctx context.Context) ([]VMStatus, error) {
	ents, err := os.ReadDir(a.vmsDir())
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	gens := a.generations(ctx)
	var out []VMStatus
	for _, e := range ents {
		if vtpm.CheckVMID(e.Name()) != nil {
			continue
		}
		vm, err := a.readVM(e.Name())
		if err != nil {
			return nil, err
		}
		out = append(out, a.status(vm, gens[vm.UUID]))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// generations reads every VM's key generation once (no key is opened).
func (a *Agent) generations(ctx context.Context) map[string]uint64 {
	out := map[string]uint64{}
	if infos, err := a.keys.List(ctx); err == nil {
		for _, k := range infos {
			out[k.VMID] = k.Generation
		}
	}
	return out
}

func (a *Agent) status(vm VM, gen uint64) VMStatus {
	st := VMStatus{VM: vm, Generation: gen}
	a.mu.Lock()
	if p, ok := a.procs[vm.UUID]; ok {
		st.Running, st.SocketURI, st.CtrlSocket = true, p.proc.DataURI(), p.proc.CtrlSocket()
	}
	a.mu.Unlock()
	return st
}

func (a *Agent) readVM(id string) (VM, error) {
	b, err := os.ReadFile(a.vmRecordPath(id))
	if err != nil {
		return VM{}, fmt.Errorf("read VM %s: %w", id, err)
	}
	var vm VM
	if err := json.Unmarshal(b, &vm); err != nil || vm.UUID != id {
		return VM{}, fmt.Errorf("read VM %s: %w: vm.json", id, vtpm.ErrCorrupt)
	}
	return vm, nil
}

// findVM finds a VM by name or UUID.
func (a *Agent) findVM(ref string) (VM, error) {
	if vtpm.CheckVMID(ref) == nil {
		if vm, err := a.readVM(ref); err == nil {
			return vm, nil
		}
	}
	ents, _ := os.ReadDir(a.vmsDir())
	for _, e := range ents {
		if vm, err := a.readVM(e.Name()); err == nil && vm.Name == ref {
			return vm, nil
		}
	}
	return VM{}, fmt.Errorf("%w: %q", ErrVMNotFound, ref)
}

// vmProcess is a vTPM this agent runs (for tests and demos; under libvirt,
// libvirt runs swtpm with the same key and state).
type vmProcess struct {
	vm   VM
	proc *swtpm.Process
}

func (p *vmProcess) stop(ctx context.Context) error { return p.proc.Stop(ctx) }

// StartVM starts a VM's vTPM: it opens the VM key (no TPM command) and
// starts swtpm on the encrypted state with the key as --key and
// --migration-key passphrase.
func (a *Agent) StartVM(ctx context.Context, ref string) (VMStatus, error) {
	vm, err := a.findVM(ref)
	if err != nil {
		return VMStatus{}, fmt.Errorf("start vTPM: %w", err)
	}
	a.mu.Lock()
	if a.closed {
		a.mu.Unlock()
		return VMStatus{}, ErrClosed
	}
	if _, ok := a.procs[vm.UUID]; ok {
		a.mu.Unlock()
		return VMStatus{}, fmt.Errorf("start vTPM %s: %w", vm.Name, ErrVMRunning)
	}
	a.mu.Unlock()
	key, gen, err := a.keys.Get(ctx, vm.UUID)
	if err != nil {
		return VMStatus{}, fmt.Errorf("start vTPM %s: %w", vm.Name, err)
	}
	pass := key.Passphrase()
	key.Destroy()
	defer wipe(pass)
	log := a.log.WithFields(logrus.Fields{"vm": vm.Name, "vm_uuid": vm.UUID, "generation": gen})
	sockDir := filepath.Join(a.cfg.RunDir, vm.UUID)
	if err := os.MkdirAll(sockDir, 0o700); err != nil {
		return VMStatus{}, fmt.Errorf("start vTPM %s: %w", vm.Name, err)
	}
	proc, err := swtpm.Start(ctx, swtpm.ProcessConfig{
		StateDir: a.vmStateDir(vm.UUID), Passphrase: pass,
		SocketDir: sockDir, Log: log,
	})
	if err != nil {
		return VMStatus{}, fmt.Errorf("start vTPM %s: %w", vm.Name, err)
	}
	if err := proc.Init(ctx); err != nil {
		_ = proc.Stop(ctx)
		return VMStatus{}, fmt.Errorf("start vTPM %s: %w", vm.Name, err)
	}
	a.mu.Lock()
	a.procs[vm.UUID] = &vmProcess{vm: vm, proc: proc}
	a.mu.Unlock()
	log.WithField("socket", proc.DataURI()).Info("vTPM started")
	return a.status(vm, gen), nil
}

// StopVM stops a VM's vTPM, saving its state.
func (a *Agent) StopVM(ctx context.Context, ref string) error {
	vm, err := a.findVM(ref)
	if err != nil {
		return fmt.Errorf("stop vTPM: %w", err)
	}
	a.mu.Lock()
	p, ok := a.procs[vm.UUID]
	delete(a.procs, vm.UUID)
	a.mu.Unlock()
	if !ok {
		return fmt.Errorf("stop vTPM %s: not running here", vm.Name)
	}
	if err := p.stop(ctx); err != nil {
		return fmt.Errorf("stop vTPM %s: %w", vm.Name, err)
	}
	a.log.WithFields(logrus.Fields{"vm": vm.Name, "vm_uuid": vm.UUID}).Info("vTPM stopped")
	return nil
}

// StartAll starts the vTPM of every VM this agent has a record and a key
// for, with its own swtpm (hosts without a hypervisor: tests and demos).
func (a *Agent) StartAll(ctx context.Context) ([]VMStatus, error) {
	vms, err := a.ListVMs(ctx)
	if err != nil {
		return nil, err
	}
	for _, vm := range vms {
		if _, err := a.StartVM(ctx, vm.UUID); err != nil {
			return nil, err
		}
	}
	return a.ListVMs(ctx)
}
