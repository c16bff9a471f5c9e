package hypervisor

import (
	"crypto/sha256"
	"fmt"
	"strings"
)

// SecretUUID is the UUID of a VM's vTPM secret: derived from the VM UUID
// (SHA-256, RFC 9562 version 8), the same on every host, so that the
// domain XML's <encryption secret='…'/> is valid wherever the VM runs.
// Pure Go: the libvirt hook (vtpmctl) recognises vtpmm's VMs by it without
// linking libvirt.
func SecretUUID(vmUUID string) string {
	s := sha256.Sum256([]byte("vtpmm vtpm secret " + strings.ToLower(vmUUID)))
	b := s[:16]
	b[6] = b[6]&0x0f | 0x80
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}
