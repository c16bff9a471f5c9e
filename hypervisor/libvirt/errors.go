package libvirt

import "errors"

// Errors of this package; hypervisor failures use the hypervisor package's
// sentinels (ErrNoDomain, ErrSecretMissing, ...).
var (
	// ErrBadConfig means a Config or VMSpec is incomplete or invalid.
	ErrBadConfig = errors.New("libvirt: bad configuration")
	// ErrClosed means the Hypervisor was closed.
	ErrClosed = errors.New("libvirt: hypervisor closed")
	// ErrNoVTPM means the domain has no emulator vTPM.
	ErrNoVTPM = errors.New("libvirt: domain has no emulator vTPM")
	// ErrConnClosed means libvirt closed a connection (libvirtd went away,
	// or keepalive found it unresponsive).
	ErrConnClosed = errors.New("libvirt: connection closed")
	// ErrLibvirt is any other libvirt failure (the message follows).
	ErrLibvirt = errors.New("libvirt error")
)
