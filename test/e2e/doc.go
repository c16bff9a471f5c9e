// Package e2e is the end-to-end harness of vtpmm on real components: each
// emulated hypervisor host gets a network namespace joined to the others
// through a bridge, private mount and UTS namespaces with bind mounts over
// libvirt's directories, its own libvirtd (under a child subreaper, see
// cmd/subreaper), QEMU and swtpm, and its own emulated host TPM.
//
// The harness itself builds with every `go test ./...`; the tests that
// start daemons are behind the build tag e2e:
//
//	go test -tags e2e ./test/e2e/...
//
// They need root, /dev/kvm (or they fall back to TCG), libvirtd, QEMU,
// swtpm, iproute2 and the libvirt-qemu user; they skip when something is
// missing. See docs/libvirt.md.
package e2e
