package host

import (
	"errors"

	"github.com/vtpmm/vtpmm/internal/errclass"
)

// Sentinel errors of package host.
var (
	// ErrConfig means the configuration is invalid; the message names the field.
	ErrConfig = errors.New("invalid configuration")
	// ErrVMNotFound means no VM of that name or UUID is known on this host.
	ErrVMNotFound = errors.New("VM not found")
	// ErrVMExists means a VM with that name or UUID already exists.
	ErrVMExists = errors.New("VM already exists")
	// ErrVMRunning means the operation needs the VM's vTPM stopped (class
	// in-use).
	ErrVMRunning = errclass.Mark(errclass.InUse, "VM vTPM is running")
	// ErrVMDamaged means the VM's key envelope is damaged: the VM cannot
	// start or move until it is restored (class damaged).
	ErrVMDamaged = errclass.Mark(errclass.Damaged, "VM key envelope damaged")
	// ErrVMNotRunning means the VM's vTPM does not run here.
	ErrVMNotRunning = errors.New("VM vTPM is not running here")
	// ErrClosed means the host was closed.
	ErrClosed = errors.New("host closed")
)
