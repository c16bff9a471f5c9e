package host

import "errors"

// Sentinel errors of package host.
var (
	// ErrConfig means the configuration is invalid; the message names the field.
	ErrConfig = errors.New("invalid configuration")
	// ErrVMNotFound means no VM of that name or UUID is known on this host.
	ErrVMNotFound = errors.New("VM not found")
	// ErrVMExists means a VM with that name or UUID already exists.
	ErrVMExists = errors.New("VM already exists")
	// ErrVMRunning means the operation needs the VM's vTPM stopped.
	ErrVMRunning = errors.New("VM vTPM is running")
	// ErrVMNotRunning means the VM's vTPM does not run here.
	ErrVMNotRunning = errors.New("VM vTPM is not running here")
	// ErrClosed means the host was closed.
	ErrClosed = errors.New("host closed")
)
