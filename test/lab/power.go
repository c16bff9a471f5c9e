package lab

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/vtpmm/vtpmm/vtpm/emuhost"
)

// ErrPower means a host could not be powered off or on.
var ErrPower = errors.New("lab power")

// netnsInode is the inode of a named network namespace (/run/netns/NAME).
func netnsInode(ns string) (uint64, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(filepath.Join("/run/netns", ns), &st); err != nil {
		return 0, fmt.Errorf("%w: network namespace %s: %v", ErrPower, ns, err)
	}
	return st.Ino, nil
}

// netnsFile is the file in a host's directory that names its network
// namespace and its inode ("NAME INODE"), so that a process which does not
// see /run/netns (another host's private mount namespace: the fence agent
// run by a vtpmd) still finds the host's processes.
const netnsFile = "netns"

func writeNetnsFile(dir, ns string) error {
	ino, err := netnsInode(ns)
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, netnsFile), []byte(fmt.Sprintf("%s %d\n", ns, ino)), 0o644)
}

// HostProcs are the processes of a lab host, found from its directory
// alone: those in its network namespace (libvirtd, every QEMU and its
// swtpm, vtpmd, virsh and vtpmctl run through nsenter) and its host TPM's
// swtpm (emuhost runs it in the test process' namespaces; its command line
// names its state directory).
type HostProcs struct {
	Netns, HostTPM []int
}

// Running is the number of processes.
func (p HostProcs) Running() int { return len(p.Netns) + len(p.HostTPM) }

// FindHostProcs lists the processes of the lab host whose directory is
// dir (Host.Dir: NETWORK_DIR/HOST).
func FindHostProcs(dir string) (HostProcs, error) {
	var out HostProcs
	b, err := os.ReadFile(filepath.Join(dir, netnsFile))
	if err != nil {
		return out, fmt.Errorf("%w: %s is not a lab host's directory: %v", ErrPower, dir, err)
	}
	var ns string
	var ino uint64
	if _, err := fmt.Sscanf(string(b), "%s %d", &ns, &ino); err != nil {
		return out, fmt.Errorf("%w: %s: %v", ErrPower, filepath.Join(dir, netnsFile), err)
	}
	tpmArg := []byte("dir=" + filepath.Join(dir, "hosttpm", "state") + "\x00")
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return out, err
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		var st syscall.Stat_t
		if syscall.Stat(filepath.Join("/proc", e.Name(), "ns/net"), &st) == nil && st.Ino == ino {
			out.Netns = append(out.Netns, pid)
			continue
		}
		if cl, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline")); err == nil &&
			bytes.HasPrefix(cl, []byte("swtpm\x00")) && bytes.Contains(cl, tpmArg) {
			out.HostTPM = append(out.HostTPM, pid)
		}
	}
	return out, nil
}

// KillHost cuts a lab host's power from its directory alone (the lab's
// fence agent, cmd/fence_lab, and Host.PowerOff): every process of the
// host (FindHostProcs) gets SIGKILL at once, again until none is left (a
// process may fork while it dies), for at most 10 s. It returns how many
// it killed.
func KillHost(dir string) (int, error) {
	killed := 0
	deadline := time.Now().Add(10 * time.Second)
	for {
		p, err := FindHostProcs(dir)
		if err != nil {
			return killed, err
		}
		if p.Running() == 0 {
			return killed, nil
		}
		if time.Now().After(deadline) {
			return killed, fmt.Errorf("%w: processes of %s survive SIGKILL: %+v", ErrPower, dir, p)
		}
		for _, pid := range append(p.HostTPM, p.Netns...) {
			if syscall.Kill(pid, syscall.SIGKILL) == nil {
				killed++
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Off reports whether nothing of the host runs: no process in its network
// namespace and no host TPM; else what runs.
func (h *Host) Off() (bool, string) {
	p, err := FindHostProcs(h.Dir)
	if err != nil {
		return false, err.Error()
	}
	if p.Running() > 0 {
		return false, fmt.Sprintf("processes %v, host TPM %v", p.Netns, p.HostTPM)
	}
	return true, ""
}

// PowerOff cuts the host's power: at once, every process of its network
// namespace (libvirtd, every QEMU and its swtpm, vtpmd with its registry
// member, any virsh) and its host TPM's swtpm get SIGKILL (KillHost).
// Nothing runs a shutdown path; the host TPM keeps its NV state
// (persistent objects, the vault's seal, the rollback anchor) as a real
// one does. PowerOn brings it back. A FleetHost's vtpmd dies with it
// (FleetHost.PowerOff waits for its process).
func (h *Host) PowerOff() error {
	if _, err := KillHost(h.Dir); err != nil {
		return err
	}
	select {
	case <-h.done:
	case <-time.After(10 * time.Second):
		return fmt.Errorf("%w: the subreaper of %s did not exit", ErrPower, h.Name)
	}
	return nil
}

// PowerOn boots the host after PowerOff (or ReplaceTPM): /run is empty as
// after a reboot (libvirt's runtime state and pid files gone; its
// persistent domains and secrets' definitions stay), the host TPM starts on
// its state with fresh PCRs and is measured with the host's boot log,
// libvirtd starts, and the Hypervisor reconnects. The VMs are not started
// (no autostart).
func (h *Host) PowerOn(ctx context.Context) error {
	if off, why := h.Off(); !off {
		return fmt.Errorf("%w: %s is on: %s", ErrPower, h.Name, why)
	}
	if err := os.RemoveAll(h.Path("/run/libvirt")); err != nil {
		return err
	}
	if err := os.MkdirAll(h.Path("/run/libvirt"), 0o755); err != nil {
		return err
	}
	if err := h.Emu.Restart(ctx); err != nil {
		return fmt.Errorf("%w: host TPM of %s: %v", ErrPower, h.Name, err)
	}
	if err := h.bootTPM(ctx); err != nil {
		return err
	}
	if h.Hyp != nil {
		_ = h.Hyp.Close()
	}
	h.done = make(chan struct{})
	if err := h.start(ctx, h.net); err != nil {
		return err
	}
	return h.connect(ctx)
}

// bootTPM extends the host's boot log into its host TPM's PCRs.
func (h *Host) bootTPM(ctx context.Context) error {
	if h.cfg.BootLog == "" {
		return nil
	}
	b, err := os.ReadFile(h.cfg.BootLog)
	if err == nil {
		err = h.Emu.Boot(ctx, b)
	}
	if err != nil {
		return fmt.Errorf("%w: boot host TPM of %s: %v", ErrPower, h.Name, err)
	}
	return nil
}

// ReplaceTPM destroys the host's TPM and installs a new one, as a TPM or
// motherboard replacement: the host must be off (PowerOff); the old TPM's
// state (its seeds, EK, NV: the vault's seal and every key under it) is
// wiped, and a new TPM is manufactured in its place with a new EK
// certified by the same local CA (which the fleet already trusts). The
// host's vtpmd must then run 'vtpmd init' and be enrolled again.
// PowerOn boots it.
func (h *Host) ReplaceTPM(ctx context.Context) error {
	if off, why := h.Off(); !off {
		return fmt.Errorf("%w: replace the TPM of %s while it runs (%s)", ErrPower, h.Name, why)
	}
	old := h.Emu
	_ = old.Stop(ctx)
	state := filepath.Join(old.Dir(), "state")
	if err := os.RemoveAll(state); err != nil {
		return err
	}
	emu, err := emuhost.Start(ctx, emuhost.Config{Dir: old.Dir(), Name: h.Name})
	if err != nil {
		return fmt.Errorf("%w: new host TPM of %s: %v", ErrPower, h.Name, err)
	}
	h.Emu = emu
	// PowerOn restarts it (a reboot): stop it now, the host is off.
	return emu.Stop(ctx)
}

// WipeTPM destroys the host TPM's state (a dead TPM): nothing sealed
// under it can be unsealed again. The host must be off.
func (h *Host) WipeTPM() error {
	if off, why := h.Off(); !off {
		return fmt.Errorf("%w: wipe the TPM of %s while it runs (%s)", ErrPower, h.Name, why)
	}
	return os.RemoveAll(filepath.Join(h.Emu.Dir(), "state"))
}

// PowerOff cuts the host's power (Host.PowerOff) and waits until its
// vtpmd's process is reaped.
func (h *FleetHost) PowerOff() error {
	if err := h.Host.PowerOff(); err != nil {
		return err
	}
	if h.Vtpmd.Running() {
		select {
		case <-h.Vtpmd.done:
		case <-time.After(10 * time.Second):
			return fmt.Errorf("%w: vtpmd of %s not reaped", ErrPower, h.Name)
		}
	}
	return nil
}

// PowerOn boots the host (Host.PowerOn) and starts its vtpmd, as
// vtpmd.service does at boot.
func (h *FleetHost) PowerOn(ctx context.Context) error {
	if err := h.Host.PowerOn(ctx); err != nil {
		return err
	}
	return h.Vtpmd.Start(ctx)
}

// Reinit re-initialises the host's vtpmd after its TPM was replaced
// (Host.ReplaceTPM), as the operator does: what was sealed to the old TPM
// (the vault, the VM keys, the rollback anchor's file, the ledger, the
// host record) is moved aside to DATA_DIR.lost-tpm, since nothing can open
// it any more; the embedded registry member's data stays (the member
// rejoins); then 'vtpmd init' on the new TPM. The daemon must not run and
// the host TPM must (PowerOn starts both: call Reinit between
// Host.PowerOn and Vtpmd.Start).
func (v *Vtpmd) Reinit(ctx context.Context) (Result, error) {
	if v.Running() {
		return Result{}, fmt.Errorf("%w: vtpmd on %s runs", ErrVtpmd, v.Host.Name)
	}
	aside := v.DataDir + ".lost-tpm"
	if err := os.MkdirAll(aside, 0o700); err != nil {
		return Result{}, err
	}
	ents, err := os.ReadDir(v.DataDir)
	if err != nil {
		return Result{}, err
	}
	for _, e := range ents {
		if e.Name() == "registry" {
			continue
		}
		if err := os.Rename(filepath.Join(v.DataDir, e.Name()), filepath.Join(aside, e.Name())); err != nil {
			return Result{}, err
		}
	}
	return v.Run(ctx, "init")
}

// AppendConfig appends YAML to the host's vtpmd.yaml (e.g. the escrow and
// backup sections); the daemon must not be running yet.
func (v *Vtpmd) AppendConfig(yaml string) error {
	if v.Running() {
		return fmt.Errorf("%w: vtpmd on %s already runs; change its configuration before Start", ErrVtpmd, v.Host.Name)
	}
	fh, err := os.OpenFile(v.ConfigPath, os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	_, err = fh.WriteString(yaml)
	if cerr := fh.Close(); err == nil {
		err = cerr
	}
	return err
}
