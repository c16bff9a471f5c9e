// Package e2e holds the end-to-end tests of vtpmm on real components, on
// the hosts of package test/lab: network namespaces, one libvirtd, QEMU and
// swtpm per host, an emulated host TPM, and the real vtpmd and vtpmctl.
//
// The tests are behind the build tag e2e:
//
//	go test -tags e2e ./test/e2e/...
//
// They need root, /dev/kvm (or they fall back to TCG), libvirtd, QEMU,
// swtpm, iproute2 and the libvirt-qemu user; they skip when something is
// missing (lab.Require). See docs/libvirt.md.
package e2e
