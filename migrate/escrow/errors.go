package escrow

import (
	"errors"
	"fmt"
	"strings"
)

// Sentinel errors of package escrow. Match them with errors.Is; the
// concrete errors below carry the details.
var (
	// ErrBadRecipient means a recipient string or file was refused.
	ErrBadRecipient = errors.New("invalid escrow recipient")
	// ErrBadIdentity means an identity string or file was refused.
	ErrBadIdentity = errors.New("invalid escrow identity")
	// ErrBadPolicy means the custodians or the threshold are unusable.
	ErrBadPolicy = errors.New("invalid escrow policy")
	// ErrBadRequest means Seal was asked to seal invalid contents.
	ErrBadRequest = errors.New("invalid escrow request")

	// ErrMalformed means a bundle failed the structural check made before
	// any share is opened: it is not a bundle, is truncated, exceeds a size
	// limit or is not in the strict encoding Seal writes.
	ErrMalformed = errors.New("malformed escrow bundle")
	// ErrUnsupportedVersion means the bundle's format version is unknown to this build.
	ErrUnsupportedVersion = errors.New("unsupported escrow bundle version")
	// ErrWrongVM means the bundle belongs to another VM than the caller expects.
	ErrWrongVM = errors.New("escrow bundle is for another VM")
	// ErrWrongIdentity means none of the identities given opens any share.
	ErrWrongIdentity = errors.New("no identity given opens a share of this bundle")
	// ErrNotEnoughShares means fewer than k shares were opened. The
	// concrete error is a *SharesError naming who holds the others.
	ErrNotEnoughShares = errors.New("not enough custodian shares")
	// ErrTampered means the bundle was changed after it was sealed. The
	// concrete error is a *TamperError naming the part that failed.
	ErrTampered = errors.New("escrow bundle was tampered with")
	// ErrPlugin means an age plugin failed or could not be started.
	ErrPlugin = errors.New("age plugin failed")

	// ErrBundleExists means a bundle file of that name is already there.
	ErrBundleExists = errors.New("bundle file already exists")
	// ErrStaleBundle means a restore would roll the VM back to a generation
	// below one the registry has seen.
	ErrStaleBundle = errors.New("bundle is older than the VM's current generation")
	// ErrOwnerActive means the VM's current owner has not been fenced or
	// drained, so a restore could run a second copy.
	ErrOwnerActive = errors.New("the VM's current owner is not fenced or drained")
	// ErrKeyUsed means the opened key was already released or destroyed.
	ErrKeyUsed = errors.New("the opened VM key was already released")

	// ErrSecretMarshal is returned by every attempt to marshal an identity.
	ErrSecretMarshal = errors.New("refusing to marshal an escrow identity")
)

// SharesError reports a restore that could not gather k shares. It says
// how many are needed, whose shares were opened, which custodians hold the
// others, and what went wrong with the identities given.
type SharesError struct {
	Need      int      // k
	Opened    []string // custodians whose shares opened
	Missing   []string // custodians whose shares did not open
	Unmatched []string // identities given that opened no share (never key material)
	Problems  []string // plugin failures, damaged shares
	Tampered  []*TamperError
}

func (e *SharesError) Error() string {
	var b strings.Builder
	if len(e.Opened) == 0 {
		b.WriteString("no identity given opens a share of this bundle")
	} else {
		fmt.Fprintf(&b, "%d of %d shares needed, %d opened (%s)", e.Need, len(e.Opened)+len(e.Missing), len(e.Opened), strings.Join(e.Opened, ", "))
	}
	if missing := e.Need - len(e.Opened); missing > 0 {
		fmt.Fprintf(&b, ": %d more needed from the custodians %s", missing, strings.Join(e.Missing, ", "))
	}
	if len(e.Unmatched) > 0 {
		fmt.Fprintf(&b, "; identities that open no share: %s", strings.Join(e.Unmatched, ", "))
	}
	if len(e.Problems) > 0 {
		fmt.Fprintf(&b, "; %s", strings.Join(e.Problems, "; "))
	}
	return b.String()
}

// Unwrap makes the error match ErrNotEnoughShares; ErrWrongIdentity when
// nothing opened at all; and ErrTampered (a *TamperError) when a share
// that opened was damaged.
func (e *SharesError) Unwrap() []error {
	out := []error{ErrNotEnoughShares}
	if len(e.Opened) == 0 {
		out = append(out, ErrWrongIdentity)
	}
	for _, t := range e.Tampered {
		out = append(out, t)
	}
	return out
}

// TamperError names the part of a bundle that failed authentication.
type TamperError struct {
	Part      string // "header", "state", "share"
	Custodian string // for Part "share"
	Detail    string
}

func (e *TamperError) Error() string {
	if e.Custodian != "" {
		return fmt.Sprintf("%v: %s of custodian %s: %s", ErrTampered, e.Part, e.Custodian, e.Detail)
	}
	return fmt.Sprintf("%v: %s: %s", ErrTampered, e.Part, e.Detail)
}

func (e *TamperError) Unwrap() error { return ErrTampered }
