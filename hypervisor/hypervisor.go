package hypervisor

import (
	"context"
	"time"
)

// Hypervisor is one host's hypervisor as vtpmm sees it. It mirrors libvirt
// 9.0's rules for a VM with an encrypted emulator vTPM:
//
//   - The vTPM secret (the VM key's passphrase) must be defined on a host
//     before the VM's vTPM starts there, by a cold start or an incoming
//     migration; it is read only at that moment.
//   - A migration to a host that lacks the secret fails at once
//     (ErrSecretMissing); one to a host whose secret has another value fails
//     late, after memory was copied (ErrSecretMismatch). Either way the VM
//     keeps running on the source with a working vTPM.
//   - After a successful migration the VM runs only on the destination and
//     its vTPM state (what the guest sealed) came along; the source domain
//     is gone.
type Hypervisor interface {
	// Name identifies this hypervisor host (for errors and migration targets).
	Name() string
	// DefineSecret defines (or replaces) the vTPM secret of a VM, ephemeral
	// and private: it is never stored on disk and cannot be read back.
	DefineSecret(ctx context.Context, vmUUID string, value []byte) error
	// UndefineSecret removes a VM's vTPM secret; a missing secret is not an error.
	UndefineSecret(ctx context.Context, vmUUID string) error
	// HasSecret reports whether a secret is defined for the VM here.
	HasSecret(ctx context.Context, vmUUID string) (bool, error)
	// Domain reports a VM's state on this host (StateAbsent when unknown).
	Domain(ctx context.Context, vmUUID string) (Domain, error)
	// Domains lists the VMs with an emulator vTPM on this host.
	Domains(ctx context.Context) ([]Domain, error)
	// Migrate live-migrates a running VM to dest (peer to peer, persistent
	// on the destination, undefined on the source). It returns when the
	// migration has completed or failed; on failure the VM still runs here.
	Migrate(ctx context.Context, vmUUID string, dest Target) error
}

// OutgoingJob is a VM's outgoing migration job as a hypervisor reports it
// (migrate.OutgoingJobs).
type OutgoingJob struct {
	Active bool // an outgoing migration job runs
	// Started is when the job started; zero when the hypervisor cannot
	// tell. A pull made after the job started belongs to it.
	Started time.Time
	// Dest names the job's destination host; empty when the hypervisor
	// cannot tell (libvirt 9.0's job statistics name no destination).
	Dest string
}

// Target names a migration destination.
type Target struct {
	Name string // host name, as the destination's Hypervisor.Name()
	URI  string // hypervisor URI (libvirt: qemu+tcp://10.251.0.2/system)
}

// State is a domain's state on one host.
type State string

// Domain states.
const (
	StateAbsent  State = "absent"  // not defined on this host
	StateRunning State = "running" // running here
	StateShutoff State = "shutoff" // defined, not running
	StatePaused  State = "paused"  // defined, paused (e.g. at the end of a migration)
)

// Domain is a VM as the hypervisor knows it.
type Domain struct {
	UUID  string
	Name  string
	State State
}
