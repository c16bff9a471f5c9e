package escrow

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"

	"filippo.io/age"
	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/vtpm"
)

// OpenOptions configures Open.
type OpenOptions struct {
	Log logrus.FieldLogger // nil: no logging
	// AcceptDamagedShares opens a bundle in which some custodian's share
	// changed after sealing, provided k intact shares rebuild the key: the
	// key and the state are still authenticated. Without it such a bundle
	// is refused with a *TamperError naming the custodian.
	AcceptDamagedShares bool
}

// Opened is an unlocked bundle: its authenticated header, its verified
// state blob, and the VM key, in memory only. Destroy it when done.
type Opened struct {
	Header  Header   // authenticated by the bundle key
	State   []byte   // the vTPM state blob; its SHA-256 matched the header
	Used    []string // custodians whose shares rebuilt the bundle key
	Damaged []string // custodians whose shares changed after sealing (with AcceptDamagedShares)

	key      vtpm.VMKey
	released bool
}

// Key returns the VM key. It stays owned by o: Destroy wipes it.
func (o *Opened) Key() vtpm.VMKey { return o.key }

// Destroy wipes the VM key.
func (o *Opened) Destroy() { o.key.Destroy() }

// opened is one share that decrypted and matched its commitment.
type openedShare struct {
	custodian string
	share
}

// Open unlocks a bundle with custodians' identities and returns the VM key
// in memory (as vtpm.VMKey) with the state blob. expectVM is the VM the
// caller means to restore; a bundle of another VM is refused before any
// share is opened (ErrWrongVM).
//
// The refusals, each with its own sentinel: a malformed bundle
// (ErrMalformed), an unknown format version (ErrUnsupportedVersion),
// another VM (ErrWrongVM), no identity that opens a share
// (ErrWrongIdentity), fewer than k shares (ErrNotEnoughShares, with a
// *SharesError naming who holds the others), and a bundle changed after
// sealing (ErrTampered, with a *TamperError naming the part).
//
// Identities are tried custodian by custodian, native ones first; a plugin
// identity is run only for a custodian with a recipient it can serve (the
// same plugin, or a tagged hardware-key recipient), and Open stops once k
// shares are open, so a hardware token is asked no more than needed.
func Open(ctx context.Context, bundle []byte, expectVM string, ids []*Identity, opts OpenOptions) (*Opened, error) {
	d, err := decodeBundle(bundle)
	if err != nil {
		return nil, fmt.Errorf("open bundle: %w", err)
	}
	h := &d.hdr
	if err := vtpm.CheckVMID(expectVM); err != nil {
		return nil, fmt.Errorf("open bundle: %w: expected VM: %w", ErrBadRequest, err)
	}
	if h.VM.UUID != expectVM {
		return nil, fmt.Errorf("open bundle %s: %w: it holds VM %s (%q), not %s", h.ID, ErrWrongVM, h.VM.UUID, h.VM.Name, expectVM)
	}
	log := opts.Log
	if log == nil {
		l := logrus.New()
		l.Out = io.Discard
		log = l
	}
	id, _ := hex.DecodeString(h.ID)
	got, suspects, serr := gatherShares(ctx, d, id, ids)
	defer func() {
		for _, s := range got {
			clear(s.y)
		}
	}()
	if serr != nil {
		return nil, fmt.Errorf("open bundle %s of VM %s: %w", h.ID, h.VM.UUID, serr)
	}
	used := make([]string, len(got))
	for i, s := range got {
		used[i] = s.custodian
	}
	var bk []byte
	if h.Threshold == 1 {
		bk = bytes.Clone(got[0].y)
	} else {
		pts := make([]share, len(got))
		for i, s := range got {
			pts[i] = s.share
		}
		if bk, err = combineShares(pts); err != nil {
			return nil, fmt.Errorf("open bundle %s: %w", h.ID, err)
		}
	}
	defer clear(bk)
	sealer, err := bundleSealer(bk, id, nil)
	if err != nil {
		return nil, fmt.Errorf("open bundle %s: %w", h.ID, err)
	}
	key, err := sealer.OpenKey(vtpm.Sealed{Nonce: d.nonce, Ciphertext: d.ct}, keyBinding(d.ad, h.Generation))
	if err != nil {
		return nil, fmt.Errorf("open bundle %s of VM %s: %w", h.ID, h.VM.UUID, &TamperError{Part: "header",
			Detail: fmt.Sprintf("the bundle key rebuilt from the shares of %s does not authenticate the header and sealed key: they were changed after sealing (or shares were replaced together with their commitments)", strings.Join(used, ", "))})
	}
	if sum := sha256.Sum256(d.state); hex.EncodeToString(sum[:]) != h.State.SHA256 {
		key.Destroy()
		return nil, fmt.Errorf("open bundle %s of VM %s: %w", h.ID, h.VM.UUID, &TamperError{Part: "state",
			Detail: fmt.Sprintf("SHA-256 of the state blob is %x, the authenticated header says %s", sum[:8], h.State.SHA256[:16])})
	}
	// The header is authentic now, so a share whose digest differs from it
	// was changed after sealing.
	if len(suspects) > 0 && !opts.AcceptDamagedShares {
		key.Destroy()
		return nil, fmt.Errorf("open bundle %s of VM %s: %w", h.ID, h.VM.UUID, &TamperError{Part: "share", Custodian: strings.Join(suspects, ", "),
			Detail: "changed after sealing (its SHA-256 differs from the authenticated header); the VM key and state are intact and were rebuilt from " + strings.Join(used, ", ") + ": accept damaged shares to restore without it"})
	}
	o := &Opened{Header: *h, State: bytes.Clone(d.state), Used: used, Damaged: suspects, key: key}
	for _, c := range suspects {
		log.WithFields(logrus.Fields{"bundle": h.ID, "custodian": c}).Warn("escrow share changed after sealing; restored without it")
	}
	o.Header.Custodians = slices.Clone(h.Custodians)
	log.WithFields(logrus.Fields{"vm": h.VM.UUID, "gen": h.Generation, "bundle": h.ID, "custodians": strings.Join(used, ",")}).Info("escrow bundle opened")
	return o, nil
}

// gatherShares decrypts shares until k of them are open. A share whose
// SHA-256 differs from the (not yet authenticated) header is not tried:
// it is returned as a suspect, confirmed once the header authenticates.
// On failure it returns a *SharesError.
func gatherShares(ctx context.Context, d *decoded, id []byte, ids []*Identity) ([]openedShare, []string, error) {
	h := &d.hdr
	var natives, plugins []*Identity
	for _, i := range ids {
		if i == nil || i.id == nil {
			continue
		}
		if i.kind.Plugin() != "" {
			plugins = append(plugins, i)
		} else {
			natives = append(natives, i)
		}
	}
	var (
		got      []openedShare
		suspects []string
		problems []string
		tampered []*TamperError
		opened   = map[string]bool{}
		matched  = map[*Identity]bool{}
	)
	done := map[string]bool{} // opened, suspect or damaged: not tried again
	// Pass 0 tries, for each custodian, the native identities whose
	// recipient fingerprint is on the share's label, and the plugins that
	// can serve it. Labels are not authenticated before unlock, so pass 1
	// tries the remaining native identities on the shares still closed.
	for pass := range 2 {
		for ci, c := range h.Custodians {
			if len(got) >= h.Threshold {
				break
			}
			if done[c.Name] {
				continue
			}
			if err := ctx.Err(); err != nil {
				return got, nil, err
			}
			if digestHex(d.shares[ci]) != c.ShareSHA256 {
				done[c.Name] = true
				suspects = append(suspects, c.Name)
				te := &TamperError{Part: "share", Custodian: c.Name, Detail: "its SHA-256 differs from the header (the share or the header changed after sealing)"}
				tampered = append(tampered, te)
				problems = append(problems, te.Error())
				continue
			}
			for _, cand := range candidates(c, natives, plugins, pass) {
				pt, who, err := decryptShare(d.shares[ci], cand)
				if err != nil {
					var nm *age.NoIdentityMatchError
					switch {
					case errors.As(err, &nm):
					case cand[0].kind.Plugin() != "":
						problems = append(problems, fmt.Sprintf("custodian %s: %v: %v", c.Name, ErrPlugin, err))
					default:
						done[c.Name] = true
						te := &TamperError{Part: "share", Custodian: c.Name, Detail: "the age file does not decrypt: " + err.Error()}
						tampered = append(tampered, te)
						problems = append(problems, te.Error())
					}
					continue
				}
				matched[who] = true
				done[c.Name] = true
				y, terr := checkShare(pt, id, c)
				clear(pt)
				if terr != nil {
					tampered = append(tampered, terr)
					problems = append(problems, terr.Error())
					break
				}
				got = append(got, openedShare{custodian: c.Name, share: share{x: byte(c.X), y: y}})
				opened[c.Name] = true
				break
			}
		}
	}
	if len(got) >= h.Threshold {
		// Shares not needed were not decrypted; still check their digests.
		for ci := range h.Custodians {
			c := h.Custodians[ci]
			if !opened[c.Name] && !slices.Contains(suspects, c.Name) && digestHex(d.shares[ci]) != c.ShareSHA256 {
				suspects = append(suspects, c.Name)
			}
		}
		return got[:h.Threshold], suspects, nil
	}
	for _, s := range got {
		clear(s.y)
	}
	e := &SharesError{Need: h.Threshold, Problems: problems, Tampered: tampered}
	for _, c := range h.Custodians {
		if opened[c.Name] {
			e.Opened = append(e.Opened, c.Name)
		} else {
			e.Missing = append(e.Missing, c.Name)
		}
	}
	for _, i := range ids {
		if i != nil && !matched[i] {
			e.Unmatched = append(e.Unmatched, i.String())
		}
	}
	if len(ids) == 0 {
		e.Problems = append(e.Problems, "no identity was given")
	}
	return nil, nil, e
}

// candidates lists the identity groups to try on one custodian's share.
// Pass 0: the native identities whose recipient is on the share's label,
// then each plugin identity that can serve one of its recipients (the same
// plugin, or a tagged hardware-key recipient). Pass 1: the other native
// identities, in case the labels lie.
func candidates(c CustodianShare, natives, plugins []*Identity, pass int) [][]*Identity {
	labelled := func(id *Identity) bool {
		for _, r := range c.Recipients {
			if r.Fingerprint == id.fp {
				return true
			}
		}
		return false
	}
	var group []*Identity
	for _, n := range natives {
		if labelled(n) == (pass == 0) {
			group = append(group, n)
		}
	}
	var out [][]*Identity
	if len(group) > 0 {
		out = append(out, group)
	}
	if pass > 0 {
		return out
	}
	for _, p := range plugins {
		for _, r := range c.Recipients {
			if r.Kind == p.kind || r.Kind == KindTag || r.Kind == KindTagPQ {
				out = append(out, []*Identity{p})
				break
			}
		}
	}
	return out
}

// decryptShare opens one age file with a group of identities and says
// which identity matched.
func decryptShare(file []byte, group []*Identity) ([]byte, *Identity, error) {
	var who *Identity
	ais := make([]age.Identity, len(group))
	for i, g := range group {
		ais[i] = recordingIdentity{g, &who}
	}
	r, err := age.Decrypt(bytes.NewReader(file), ais...)
	if err != nil {
		return nil, nil, err
	}
	pt, err := io.ReadAll(io.LimitReader(r, int64(shareSize)+1))
	if err != nil {
		clear(pt)
		return nil, nil, err
	}
	return pt, who, nil
}

// recordingIdentity notes which identity unwrapped the file key.
type recordingIdentity struct {
	id  *Identity
	who **Identity
}

func (r recordingIdentity) Unwrap(st []*age.Stanza) ([]byte, error) {
	k, err := r.id.id.Unwrap(st)
	if err == nil {
		*r.who = r.id
	}
	return k, err
}

// checkShare validates a decrypted share against the bundle (its ID)
// and the custodian's x, and returns its y.
func checkShare(pt, id []byte, c CustodianShare) ([]byte, *TamperError) {
	if len(pt) != shareSize || !bytes.HasPrefix(pt, []byte(sharePrefix)) {
		return nil, &TamperError{Part: "share", Custodian: c.Name, Detail: "the decrypted share is not a vtpmm share"}
	}
	rest := pt[len(sharePrefix):]
	if !bytes.Equal(rest[:idBytes], id) {
		return nil, &TamperError{Part: "share", Custodian: c.Name, Detail: fmt.Sprintf("the share belongs to bundle %x, not this one", rest[:idBytes])}
	}
	if int(rest[idBytes]) != c.X {
		return nil, &TamperError{Part: "share", Custodian: c.Name, Detail: fmt.Sprintf("the share is for x = %d, the header says %d", rest[idBytes], c.X)}
	}
	return bytes.Clone(rest[idBytes+1:]), nil
}
