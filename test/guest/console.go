package guest

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"regexp"
	"strconv"
)

// BootMarker is what the guest extends into PCR 16 (as its SHA-256) once per
// boot; it must equal vtpmm-guest's DefaultBootMarker (the boot test checks).
const BootMarker = "vtpmm-guest-boot"

// ExpectedPCR16 is PCR 16 (SHA-256 bank, lowercase hex) of a guest after one
// boot: extend(zeros, sha256(BootMarker)). It stays so across live
// migrations and reboots; any other value means the vTPM lost or changed
// its PCR state.
func ExpectedPCR16() string {
	m := sha256.Sum256([]byte(BootMarker))
	v := sha256.Sum256(append(make([]byte, 32), m[:]...))
	return hex.EncodeToString(v[:])
}

// ErrConsole means the console log does not show a working vTPM.
var ErrConsole = errors.New("guest console check failed")

// Tick is one VTPMM-UNSEAL line.
type Tick struct {
	N      int
	Secret string // empty when Err is set
	Err    string // "ERROR ..." lines: the error text
	PCR16  string
}

// Console is what a guest printed on its serial console (one or more logs,
// concatenated in order).
type Console struct {
	Boots  []string // PCR 16 at each VTPMM-BOOT
	Sealed []string // VTPMM-SEALED secrets
	Found  []string // VTPMM-FOUND secrets
	Ticks  []Tick
	Errors []string // VTPMM-ERROR lines
}

// The serial console may interleave kernel messages, and ends lines with
// \r\n: match tokens, not whole lines.
var consoleRE = regexp.MustCompile(`VTPMM-(BOOT pcr16=([0-9a-f]*)|SEALED ([0-9a-f]+)|FOUND (\S+)|ERROR ([^\r\n]*)|UNSEAL (\d+) (\S+) pcr16=([0-9a-f?]+)(?: ([^\r\n]*))?)`)

// ParseConsole extracts the VTPMM lines of a console log.
func ParseConsole(log []byte) *Console {
	c := &Console{}
	for _, m := range consoleRE.FindAllSubmatch(log, -1) {
		switch {
		case m[2] != nil:
			c.Boots = append(c.Boots, string(m[2]))
		case m[3] != nil:
			c.Sealed = append(c.Sealed, string(m[3]))
		case m[4] != nil:
			c.Found = append(c.Found, string(m[4]))
		case m[5] != nil:
			c.Errors = append(c.Errors, string(m[5]))
		case m[6] != nil:
			n, _ := strconv.Atoi(string(m[6]))
			t := Tick{N: n, PCR16: string(m[8])}
			if string(m[7]) == "ERROR" {
				t.Err = string(m[9])
			} else {
				t.Secret = string(m[7])
			}
			c.Ticks = append(c.Ticks, t)
		}
	}
	return c
}

// Secret is the guest's secret: the first one sealed, or else the first
// one found.
func (c *Console) Secret() string {
	if len(c.Sealed) > 0 {
		return c.Sealed[0]
	}
	if len(c.Found) > 0 {
		return c.Found[0]
	}
	return ""
}

// Verify checks that the guest sealed (or found) one secret, and that at
// least minTicks unseal ticks followed, each of which unsealed that secret
// with PCR 16 at ExpectedPCR16. It names the first tick that failed.
func (c *Console) Verify(minTicks int) error {
	secret := c.Secret()
	if secret == "" {
		return fmt.Errorf("%w: no VTPMM-SEALED or VTPMM-FOUND line (errors: %q)", ErrConsole, c.Errors)
	}
	if len(c.Sealed) > 1 {
		return fmt.Errorf("%w: the guest sealed %d secrets: its vTPM lost the first one", ErrConsole, len(c.Sealed))
	}
	for _, s := range c.Found {
		if s != secret {
			return fmt.Errorf("%w: found secret %s, sealed %s", ErrConsole, s, secret)
		}
	}
	want := ExpectedPCR16()
	for _, p := range c.Boots {
		if p != want {
			return fmt.Errorf("%w: PCR 16 at boot is %s, want %s", ErrConsole, p, want)
		}
	}
	for _, t := range c.Ticks {
		switch {
		case t.Err != "":
			return fmt.Errorf("%w: tick %d: unseal failed: %s (pcr16=%s)", ErrConsole, t.N, t.Err, t.PCR16)
		case t.Secret != secret:
			return fmt.Errorf("%w: tick %d: unsealed %s, want %s", ErrConsole, t.N, t.Secret, secret)
		case t.PCR16 != want:
			return fmt.Errorf("%w: tick %d: PCR 16 is %s, want %s (reset or extended)", ErrConsole, t.N, t.PCR16, want)
		}
	}
	if len(c.Ticks) < minTicks {
		return fmt.Errorf("%w: %d unseal ticks, want at least %d", ErrConsole, len(c.Ticks), minTicks)
	}
	return nil
}
