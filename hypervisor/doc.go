// Package hypervisor owns what vtpmm needs from a hypervisor, in pure Go:
// the small Hypervisor interface (consumed by package migrate), the errors
// that classify hypervisor failures, the vTPM secret's UUID derivation
// (SecretUUID), the lifecycle event types, None (the one representation of
// "no hypervisor"), and a Registry of hypervisor URI schemes that the
// composition root fills. Implementations live below it: hypervisor/fake
// (a working fake that follows libvirt's rules and runs every vTPM as a
// real swtpm process) and hypervisor/libvirt (cgo; only cmd/vtpmd and the
// lab import it).
package hypervisor
