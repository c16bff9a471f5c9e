package agent

import "errors"

// Sentinel errors of package agent.
var (
	// ErrConfig means the configuration is invalid; the message names the field.
	ErrConfig = errors.New("invalid configuration")
	// ErrVMNotFound means no VM of that name or UUID is known on this host.
	ErrVMNotFound = errors.New("VM not found")
	// ErrVMExists means a VM with that name or UUID already exists.
	ErrVMExists = errors.New("VM already exists")
	// ErrVMRunning means the operation needs the VM's vTPM stopped.
	ErrVMRunning = errors.New("VM vTPM is running")
	// ErrClosed means the agent was closed.
	ErrClosed = errors.New("agent closed")
)
