// Package fleet owns the contract of a test fleet of vtpmm hosts, in the
// way of etcd's tests/framework interfaces: a Fleet of Hosts, each running
// a real vtpmd reached through its admin API, a hypervisor, and a tenant
// VM's sealed secret; and the migration scenarios (warm, cold, refused,
// crash, hook mode) written once against it (scenarios.go).
//
// Two implementations run them: test/fleet/inproc (real vtpmd daemons
// started with daemon.Start, real swtpm host TPMs and vTPMs, the fake
// hypervisor, real mTLS on loopback; plain go test) and test/lab (real
// vtpmd and vtpmctl binaries, libvirtd, QEMU and swtpm in network
// namespaces; go test -tags e2e ./test/e2e).
//
// Every fleet has the hosts "host-a" and "host-b", booted from the
// known-good log, and "host-c", booted from the tampered one
// (internal/fixtures), all enrolled with each other.
package fleet

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/internal/adminapi"
)

// The hosts of every fleet.
const (
	HostA = "host-a" // trusted
	HostB = "host-b" // trusted
	HostC = "host-c" // booted from the tampered log: refused by attestation
)

// Errors of the contract.
var (
	// ErrNotSettled means a VM has no single owner (yet).
	ErrNotSettled = errors.New("VM has no single owner")
	// ErrNoTenant means the fleet's VMs run no tenant that seals a secret
	// (firmware-only VMs); the scenarios then skip the tenant's checks.
	ErrNoTenant = errors.New("the VM runs no tenant")
)

// VM is a VM of a fleet, with an encrypted vTPM.
type VM struct {
	Name, UUID string
}

// Fleet is a set of hosts running vtpmd.
type Fleet interface {
	// Kind names the implementation ("in-process", "lab").
	Kind() string
	// Host returns a host of the fleet by name.
	Host(name string) Host
	// HostNames lists the fleet's hosts.
	HostNames() []string
	// HookMode reports whether vtpmm's hypervisor hook is installed on
	// every host (a plain hypervisor migration then moves the key).
	HookMode() bool
	// CreateVM creates a VM owned by host and starts it there. Its tenant
	// has sealed a secret in its vTPM (Host.TenantSecret reads it).
	CreateVM(ctx context.Context, host, name string) (VM, error)
	// RemoveVM stops and undefines the VM wherever it runs (its keys stay).
	RemoveVM(ctx context.Context, vm VM) error
}

// Host is one host of a fleet.
type Host interface {
	Name() string
	// Admin is vtpmctl's view of the host's vtpmd (internal/adminapi).
	Admin() *adminapi.Client
	// Hypervisor is the host's hypervisor, as seen from the test.
	Hypervisor() hypervisor.Hypervisor
	// PlainMigrate migrates vm to host to with the hypervisor alone (virsh
	// migrate --live --p2p; the fake's Migrate), as a tool on top of the
	// hypervisor does. Only hook mode moves the key then.
	PlainMigrate(ctx context.Context, vm VM, to string) error
	// Kill makes the host's vtpmd die at once (SIGKILL in the lab; in
	// process the migration node stops at its next crash point and the
	// daemon is closed). It may be called from a migration's progress
	// callback.
	Kill(ctx context.Context) error
	// Restart starts the host's vtpmd again after Kill; it reconciles open
	// transactions at start.
	Restart(ctx context.Context) error
	// TenantSecret is the secret the VM's tenant unseals from its vTPM on
	// this host now (the VM must run here).
	TenantSecret(ctx context.Context, vm VM) (string, error)
}

// Owner checks, once, that exactly one host owns the VM's key with no
// pending transaction anywhere, that this host and only this one runs the
// VM, and that only it holds the VM's hypervisor secret. It returns that
// host, and every host's view for error messages.
func Owner(ctx context.Context, f Fleet, vm VM) (string, string, error) {
	var owners, running []string
	var report strings.Builder
	for _, name := range f.HostNames() {
		h := f.Host(name)
		vms, err := h.Admin().VMs(ctx)
		if err != nil {
			return "", report.String(), fmt.Errorf("%s: %w", name, err)
		}
		for _, v := range vms {
			if v.UUID != vm.UUID {
				continue
			}
			fmt.Fprintf(&report, "%s: owned=%v generation=%d state=%s pending=%q\n", name, v.Owned, v.Generation, v.State, v.PendingTx)
			if v.PendingTx != "" {
				return "", report.String(), fmt.Errorf("%w: %s: pending transaction %s", ErrNotSettled, name, v.PendingTx)
			}
			if v.Owned {
				owners = append(owners, name)
			}
		}
		d, err := h.Hypervisor().Domain(ctx, vm.UUID)
		if err != nil {
			return "", report.String(), err
		}
		if d.State == hypervisor.StateRunning {
			running = append(running, name)
		}
	}
	if len(owners) != 1 || len(running) != 1 || owners[0] != running[0] {
		return "", report.String(), fmt.Errorf("%w: owners %v, running on %v", ErrNotSettled, owners, running)
	}
	for _, name := range f.HostNames() {
		has, err := f.Host(name).Hypervisor().HasSecret(ctx, vm.UUID)
		if err != nil || has != (name == owners[0]) {
			return "", report.String(), fmt.Errorf("%w: hypervisor secret on %s: %v, %v (owner %s)", ErrNotSettled, name, has, err, owners[0])
		}
	}
	return owners[0], report.String(), nil
}

// WaitOwner waits until Owner names want (recovery and hook mode settle in
// the background), at most limit.
func WaitOwner(ctx context.Context, f Fleet, vm VM, want string, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for {
		owner, report, err := Owner(ctx, f, vm)
		if err == nil && owner == want {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("VM %s: owner %q, want %s after %v: %v\n%s", vm.Name, owner, want, limit, err, report)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// Generation is the VM key's generation on host (0: not owned there).
func Generation(ctx context.Context, h Host, vm VM) (uint64, error) {
	vms, err := h.Admin().VMs(ctx)
	if err != nil {
		return 0, err
	}
	for _, v := range vms {
		if v.UUID == vm.UUID && v.Owned {
			return v.Generation, nil
		}
	}
	return 0, nil
}
