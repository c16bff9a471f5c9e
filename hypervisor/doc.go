// Package hypervisor owns what vtpmm needs from a hypervisor: the small
// Hypervisor interface (consumed by package migrate), the errors that
// classify hypervisor failures, and a working fake (hypervisor/fake) that
// follows libvirt's rules and runs every vTPM as a real swtpm process. The
// libvirt implementation is hypervisor/libvirt (cgo).
package hypervisor
