// Package libvirt implements hypervisor.Hypervisor on libvirt 9.0 with QEMU
// and swtpm, for VMs with an encrypted emulator vTPM.
//
// It uses the cgo binding libvirt.org/go/libvirt, linked against
// libvirt-dev (libvirt.so.0); see docs/libvirt.md for why not the
// libvirt_dlopen build tag.
//
// Secrets: each VM's vTPM secret is an ephemeral, private libvirt secret
// (usage type vtpm, usage name "vtpmm-<vm uuid>") whose UUID is derived from
// the VM UUID (hypervisor.SecretUUID), so the domain XML references the same secret UUID
// on every host and needs no rewriting on migration. libvirt never stores it
// on disk and never gives its value back.
//
// Migrate runs a live, peer-to-peer migration (VIR_MIGRATE_LIVE |
// PEER2PEER | PERSIST_DEST | UNDEFINE_SOURCE) after a pre-check on the
// destination (reachable, secret defined, domain not yet there), and maps
// libvirt's errors onto the hypervisor package's sentinels.
package libvirt
