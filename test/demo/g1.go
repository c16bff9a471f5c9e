package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/vtpmm/vtpmm/vtpm"
)

// keyEncodings names the forms a VM key is searched in.
var keyEncodings = []string{"raw", "hex", "HEX", "base64", "base64url"}

// forms holds every VM key of a key store in every encoding, to search
// files for them (the G1 check). wipe clears them.
type forms [][]byte

// keyForms takes every VM key of keys, in every encoding.
func keyForms(ctx context.Context, keys *vtpm.KeyStore) (forms, int, error) {
	infos, err := keys.List(ctx)
	if err != nil {
		return nil, 0, err
	}
	var fs forms
	for _, info := range infos {
		// The key as swtpm and libvirt get it (hex), copied out of the
		// scoped passphrase: these copies are what the scan looks for.
		_, err := keys.WithPassphrase(ctx, info.VMID, func(p []byte) error {
			pass := bytes.Clone(p)
			raw, err := hex.DecodeString(string(pass))
			if err != nil || len(raw) == 0 {
				clear(pass)
				return fmt.Errorf("VM key of %s: passphrase is not hex", info.VMID)
			}
			fs = append(fs, raw, pass, []byte(strings.ToUpper(string(pass))),
				[]byte(base64.StdEncoding.EncodeToString(raw)), []byte(base64.RawURLEncoding.EncodeToString(raw)))
			return nil
		})
		if err != nil {
			fs.wipe()
			return nil, 0, err
		}
	}
	return fs, len(infos), nil
}

func (fs forms) wipe() {
	for _, f := range fs {
		clear(f)
	}
}

// scan searches every regular file under roots (files or directories)
// for every form, and returns how many files it read. Finding one is a G1
// violation.
func (fs forms) scan(roots ...string) (int, error) {
	n := 0
	for _, root := range roots {
		err := filepath.WalkDir(root, func(p string, e os.DirEntry, err error) error {
			if err != nil || !e.Type().IsRegular() {
				return nil // vanished, a socket, a symlink
			}
			b, err := os.ReadFile(p)
			if err != nil {
				return nil
			}
			n++
			for i, f := range fs {
				if bytes.Contains(b, f) {
					return fmt.Errorf("G1 violated: a VM key (%s) appears in %s", keyEncodings[i%len(keyEncodings)], p)
				}
			}
			return nil
		})
		if err != nil {
			return n, err
		}
	}
	return n, nil
}
