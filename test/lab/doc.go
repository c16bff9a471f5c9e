// Package lab runs emulated hypervisor hosts on real components, for the
// end-to-end tests (test/e2e) and the demo (test/demo). Each host gets
// a network namespace joined to the others through a bridge, private mount
// and UTS namespaces with bind mounts over libvirt's directories, its own
// libvirtd (under a child subreaper, see cmd/subreaper), QEMU and swtpm, its
// own emulated host TPM booted from a real event log, and (Fleet) its own
// real vtpmd, provisioned with the real vtpmctl and vtpmd CLIs. Fleet.Contract
// makes a Fleet the test fleet contract (test/fleet), so the migration
// scenarios written once run on real libvirt too.
//
// For failure tests it cuts a host's power at once (Host.PowerOff: every
// process of its network namespace and its host TPM SIGKILLed; PowerOn
// brings it back), replaces or wipes its TPM (ReplaceTPM, WipeTPM,
// Vtpmd.Reinit), fences it with a fence agent of Pacemaker's convention
// (cmd/fence_lab), and partitions it from the others (Network.Cut, Heal).
//
// The package does not import "testing": it works through T, which
// *testing.T satisfies; Run provides a T for programs, with the same
// cleanup rules (everything is stopped and removed at the end, also after a
// failure or a cancellation).
//
// It needs root, iproute2, libvirtd, QEMU, swtpm and the libvirt-qemu user
// (Require); /dev/kvm is optional (VMs fall back to TCG). See
// docs/libvirt.md.
package lab
