package vtpm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// KeyCheck is the result of checking one VM's key files.
type KeyCheck struct {
	VMID string
	File string // the envelope checked
	// Pending is the transaction of a pending key (DIR/keys/<vm>.<tx>.pending),
	// or "rekey" for the new key of an unfinished rekey (<vm>.rekey); empty
	// for the VM's active key.
	Pending string
	// Generation is the envelope's generation when its header decodes.
	Generation uint64
	// Damaged is set when the envelope cannot be used; Reason says why and
	// Err holds the sentinel (ErrCorrupt, ErrWrongKey, ErrStaleGeneration,
	// ErrUnsupportedVersion) for errors.Is.
	Damaged bool
	Reason  string
	Err     error
}

func (c KeyCheck) String() string {
	what := "key"
	switch c.Pending {
	case "":
	case "rekey":
		what = "new key of an unfinished rekey"
	default:
		what = "pending key (tx " + c.Pending + ")"
	}
	if !c.Damaged {
		return fmt.Sprintf("VM %s: %s ok (generation %d)", c.VMID, what, c.Generation)
	}
	return fmt.Sprintf("VM %s: %s damaged: %s (%s)", c.VMID, what, c.Reason, c.File)
}

// CheckKeys checks every envelope in the key store, active and pending, and
// returns one result per file, sorted by VM: it decodes the envelope,
// checks that it is bound to this host, this vault and the VM its file is
// named for, that its generation is not below the VM's high-water mark, and
// opens it (no TPM command; the key is wiped at once). One damaged envelope
// does not stop the others: the caller lists that VM as damaged and keeps
// every other VM usable. The error is non-nil only when the directory
// cannot be listed.
func (s *KeyStore) CheckKeys(ctx context.Context) ([]KeyCheck, error) {
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, fmt.Errorf("check keys in %s: %w", s.dir, err)
	}
	var out []KeyCheck
	for _, e := range ents {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		name := e.Name()
		if id, ok := strings.CutSuffix(name, ".key"); ok && CheckVMID(id) == nil {
			out = append(out, s.checkOne(id, "", filepath.Join(s.dir, name)))
			continue
		}
		if id, ok := strings.CutSuffix(name, ".rekey"); ok && CheckVMID(id) == nil {
			out = append(out, s.checkOne(id, "rekey", filepath.Join(s.dir, name)))
			continue
		}
		if rest, ok := strings.CutSuffix(name, ".pending"); ok {
			id, tx, ok := strings.Cut(rest, ".")
			if ok && CheckVMID(id) == nil && checkTxID(tx) == nil {
				out = append(out, s.checkOne(id, tx, filepath.Join(s.dir, name)))
			}
		}
	}
	sort.SliceStable(out, func(i, j int) bool {
		if out[i].VMID != out[j].VMID {
			return out[i].VMID < out[j].VMID
		}
		return out[i].Pending < out[j].Pending
	})
	return out, nil
}

func (s *KeyStore) checkOne(vmID, txID, path string) KeyCheck {
	c := KeyCheck{VMID: vmID, File: path, Pending: txID}
	bad := func(err error, format string, a ...any) KeyCheck {
		c.Damaged, c.Err, c.Reason = true, err, fmt.Sprintf(format, a...)
		return c
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return bad(ErrCorrupt, "unreadable: %v", err)
	}
	if len(b) == 0 {
		return bad(ErrCorrupt, "the file is empty")
	}
	env, err := UnmarshalEnvelope(b)
	if err != nil {
		sentinel := ErrCorrupt
		if errors.Is(err, ErrUnsupportedVersion) {
			sentinel = ErrUnsupportedVersion
		}
		return bad(sentinel, "not a valid envelope: %v", err)
	}
	c.Generation = env.Generation
	switch {
	case env.VMID != vmID:
		return bad(ErrWrongKey, "the envelope is for VM %s (a file renamed or copied over?)", env.VMID)
	case env.HostID != s.hostID:
		return bad(ErrWrongKey, "the envelope is bound to host %q, this is host %q", env.HostID, s.hostID)
	case s.vault != nil && env.KeyID != s.vault.KeyID():
		return bad(ErrWrongKey, "made by vault key %s, this host's vault key is %s", env.KeyID, s.vault.KeyID())
	}
	seen, err := s.seenGeneration(vmID)
	if err != nil {
		return bad(ErrCorrupt, "the generation record %s is damaged: %v", s.seenPath(vmID), err)
	}
	if txID == "" && env.Generation < seen {
		return bad(ErrStaleGeneration, "generation %d, but this host has held generation %d (an old envelope restored?)", env.Generation, seen)
	}
	k, err := s.vault.OpenVMKey(env, s.hostID, vmID)
	if err != nil {
		sentinel := ErrCorrupt
		if errors.Is(err, ErrWrongKey) {
			sentinel = ErrWrongKey
		}
		return bad(sentinel, "does not open: %v", err)
	}
	k.Destroy()
	return c
}

// FactsFromChecks turns CheckKeys results into the ownership facts the
// rollback anchor compares: every usable active key is a holding, every
// damaged active key is listed as damaged (not compared). Pending keys are
// not ownership.
func FactsFromChecks(cs []KeyCheck) Facts {
	var f Facts
	for _, c := range cs {
		switch {
		case c.Pending != "":
		case c.Damaged:
			f.Damaged = append(f.Damaged, c.VMID)
		default:
			f.Holdings = append(f.Holdings, Holding{VMID: c.VMID, Generation: c.Generation})
		}
	}
	return f
}

// Facts reads the ownership facts from the envelope headers alone (no
// decryption): what Advance and Settle need on a hot path. An envelope
// whose header does not decode is listed as damaged.
func (s *KeyStore) Facts(ctx context.Context) (Facts, error) {
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		return Facts{}, fmt.Errorf("key store facts: %w", err)
	}
	var f Facts
	for _, e := range ents {
		id, ok := strings.CutSuffix(e.Name(), ".key")
		if !ok || CheckVMID(id) != nil {
			continue
		}
		if err := ctx.Err(); err != nil {
			return Facts{}, err
		}
		env, err := s.readEnvelope(id)
		if err != nil || env.VMID != id {
			f.Damaged = append(f.Damaged, id)
			continue
		}
		f.Holdings = append(f.Holdings, Holding{VMID: id, Generation: env.Generation})
	}
	return f, nil
}
