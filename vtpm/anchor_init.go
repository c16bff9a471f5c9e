package vtpm

import (
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// AnchorInitOptions tunes InitAnchor.
type AnchorInitOptions struct {
	// Replace undefines an index that another vault defined (an earlier
	// init on this TPM whose data directory is gone) and defines it anew.
	// The counter continues above its old value: a counter index starts at
	// the highest value any counter of the TPM ever had.
	Replace bool
}

// InitAnchor defines the anchor index (once per TPM) and writes the anchor
// file with the key store's current facts. It refuses an existing file
// (ErrAnchorExists), an index with other attributes (ErrAnchorConflict),
// and an index this vault already defined while the file is missing
// (ErrAnchorFileMissing: see AcceptAnchorState). Cost on a fresh TPM:
// NV_ReadPublic, NV_DefineSpace, NV_Increment, NV_Read.
func InitAnchor(ctx context.Context, tpm transport.TPM, v *Vault, cfg AnchorConfig, facts Facts, opts AnchorInitOptions) (*Anchor, error) {
	cfg = cfg.withDefaults()
	if err := checkFacts(facts); err != nil {
		return nil, fmt.Errorf("init anchor: %w", err)
	}
	a, err := newAnchor(tpm, v, cfg)
	if err != nil {
		return nil, fmt.Errorf("init anchor: %w", err)
	}
	if _, err := os.Lstat(cfg.path()); err == nil {
		return nil, fmt.Errorf("init anchor: %w: %s exists", ErrAnchorExists, cfg.path())
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	pub, name, defined, err := readAnchorPublic(tpm, cfg.Index)
	if err != nil {
		return nil, fmt.Errorf("init anchor: %w", err)
	}
	if defined {
		if ok, diff := sameAnchorShape(pub, cfg.Index); !ok {
			return nil, fmt.Errorf("init anchor: %w: NV index 0x%08x is %s; another program uses it: choose another index in the owner range (anchor.nv_index)",
				ErrAnchorConflict, uint32(cfg.Index), diff)
		}
		if pub.Attributes.Written {
			_, rerr := a.nv.read()
			switch {
			case rerr == nil:
				return nil, fmt.Errorf("init anchor: %w: this vault's NV index 0x%08x exists but %s does not: restore the data directory, or run 'vtpmd anchor accept' (audited)",
					ErrAnchorFileMissing, uint32(cfg.Index), cfg.path())
			case !errors.Is(rerr, ErrAnchorConflict):
				return nil, fmt.Errorf("init anchor: %w", rerr)
			case !opts.Replace:
				return nil, fmt.Errorf("init anchor: %w: NV index 0x%08x was defined by another vault (an earlier 'vtpmd init' on this TPM?); if that data directory is gone for good, init again with --replace-anchor",
					ErrAnchorConflict, uint32(cfg.Index))
			}
			if err := undefineAnchor(tpm, cfg, name); err != nil {
				return nil, fmt.Errorf("init anchor: %w", err)
			}
			defined = false
		}
		// Defined but never written: an init that crashed before its first
		// increment. The increment below proves whose it is.
	}
	if !defined {
		_, err := tpm2.NVDefineSpace{
			AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(cfg.OwnerAuth)},
			Auth:       tpm2.TPM2BAuth{Buffer: a.nv.auth},
			PublicInfo: tpm2.New2B(anchorPublic(cfg.Index)),
		}.Execute(tpm)
		if err != nil {
			return nil, tpmError(fmt.Sprintf("init anchor: define NV index 0x%08x", uint32(cfg.Index)), err)
		}
	}
	if err := a.nv.increment(); err != nil {
		if errors.Is(err, ErrAnchorConflict) && opts.Replace {
			if uerr := undefineAnchor(tpm, cfg, name); uerr != nil {
				return nil, fmt.Errorf("init anchor: %w", uerr)
			}
			return InitAnchor(ctx, tpm, v, cfg, facts, AnchorInitOptions{})
		}
		return nil, fmt.Errorf("init anchor: %w", err)
	}
	n, err := a.nv.read()
	if err != nil {
		return nil, fmt.Errorf("init anchor: %w", err)
	}
	now := cfg.Now().UTC()
	f := anchorFile{
		Version: anchorFileVersion, KeyID: a.keyID,
		Index: fmt.Sprintf("0x%08x", uint32(cfg.Index)), NVName: fmt.Sprintf("%x", a.nv.name.Buffer),
		Counter: n, Holdings: sortedHoldings(holdingMap(facts.Holdings)), Created: now,
	}
	if err := a.save(f); err != nil {
		return nil, fmt.Errorf("init anchor: %w", err)
	}
	a.file = f
	return a, nil
}

func undefineAnchor(tpm transport.TPM, cfg AnchorConfig, name tpm2.TPM2BName) error {
	_, err := tpm2.NVUndefineSpace{
		AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(cfg.OwnerAuth)},
		NVIndex:    tpm2.NamedHandle{Handle: cfg.Index, Name: name},
	}.Execute(tpm)
	return tpmError(fmt.Sprintf("undefine NV index 0x%08x", uint32(cfg.Index)), err)
}
