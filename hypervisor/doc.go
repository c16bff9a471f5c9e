// Package hypervisor will own the small interface vtpmm needs from a
// hypervisor (define the vTPM secret just in time, migrate, observe
// lifecycle events), its libvirt implementation and a fake that follows
// libvirt's rules. It arrives with the migration protocol (issue #4) and
// libvirt support (issue #5); nothing here yet.
package hypervisor
