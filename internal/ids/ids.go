// Package ids owns the syntax of vtpmm's identifiers: VM UUIDs (canonical,
// lowercase) and host IDs, checked the same way in configuration, on the
// wire, in the key store and in the hypervisor; and new random UUIDs. It
// imports nothing of vtpmm.
package ids

import (
	"crypto/rand"
	"fmt"
	"io"
	"regexp"
)

var (
	uuidRE   = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`)
	hostIDRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$`)
)

// IsUUID reports whether s is a canonical lowercase UUID
// (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx).
func IsUUID(s string) bool { return uuidRE.MatchString(s) }

// IsHostID reports whether s is a valid host ID: 1 to 63 letters, digits,
// '_', '.' or '-', starting with a letter or digit.
func IsHostID(s string) bool { return hostIDRE.MatchString(s) }

// HostIDRule describes IsHostID, for error messages.
const HostIDRule = "1 to 63 letters, digits, '_', '.' or '-', starting with a letter or digit"

// NewUUID returns a random (version 4) UUID drawn from r (crypto/rand when nil).
func NewUUID(r io.Reader) (string, error) {
	if r == nil {
		r = rand.Reader
	}
	var b [16]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		return "", fmt.Errorf("new UUID: %w", err)
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16]), nil
}
