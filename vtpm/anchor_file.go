package vtpm

import (
	"github.com/vtpmm/vtpmm/internal/atomicfile"

	"bytes"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"time"
)

const (
	// AnchorFileName is the anchor file inside the data directory.
	AnchorFileName    = "anchor.json"
	anchorFileVersion = 1
	maxAnchorFile     = 8 << 20
)

// AuditMark is the audit log's position at an anchor step: its record count
// and the SHA-256 of its last line (audit.Log.Head). The anchor carries it
// so that a truncated or rewritten audit log is detected at start.
type AuditMark struct {
	Seq  uint64 `json:"seq"`
	Head string `json:"head"`
}

// anchorFile is DATA/anchor.json. It is not secret; it is authenticated
// with HMAC-SHA256 under a key derived from the vault key, so that a forged
// or edited file is detected (only the vtpmd holding this vault can write
// it), and it names the vault key that authenticates it.
type anchorFile struct {
	Version int    `json:"version"`
	KeyID   string `json:"key_id"`   // the vault key whose derived key MACs this file
	Index   string `json:"nv_index"` // "0x01307601"
	NVName  string `json:"nv_name"`  // hex name of the written index
	// Counter is the TPM counter value this directory's state corresponds to.
	Counter uint64 `json:"counter"`
	// Advances counts the Advance calls since init: > 0 means the host has
	// committed ownership changes, so its ledger and audit log have history.
	Advances uint64          `json:"advances"`
	Holdings []Holding       `json:"holdings"`
	Pending  []anchorPending `json:"pending,omitempty"`
	Audit    *AuditMark      `json:"audit,omitempty"`
	Created  time.Time       `json:"created"`
	Updated  time.Time       `json:"updated"`
	MAC      string          `json:"mac"`
}

// anchorMACKey derives the file's MAC key from the vault key.
func anchorMACKey(vaultKey *secret32) ([]byte, error) {
	return hkdf.Key(sha256.New, vaultKey[:], nil, "vtpmm anchor file mac v1", 32)
}

func (f anchorFile) mac(key []byte) (string, error) {
	f.MAC = ""
	b, err := json.Marshal(f)
	if err != nil {
		return "", err
	}
	m := hmac.New(sha256.New, key)
	m.Write([]byte("vtpmm/anchor\x00"))
	m.Write(b)
	return hex.EncodeToString(m.Sum(nil)), nil
}

func writeAnchorFile(path string, f anchorFile, key []byte) error {
	f.MAC = ""
	mac, err := f.mac(key)
	if err != nil {
		return err
	}
	f.MAC = mac
	b, err := json.MarshalIndent(f, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(path, append(b, '\n'), 0o600)
}

// AnchorFileError says what is wrong with the anchor file. It unwraps to
// ErrCorrupt, ErrUnsupportedVersion, ErrWrongKey or ErrAnchorNotInitialized.
type AnchorFileError struct {
	Path    string
	Problem string
	Err     error
}

func (e *AnchorFileError) Error() string {
	fix := "restore it from this host's backup together with the rest of the data directory, or, after confirming" +
		" every VM's owner with the registry or the peers, accept the current state with 'vtpmd anchor accept' (audited)"
	if errors.Is(e.Err, ErrAnchorNotInitialized) {
		fix = "run 'vtpmd init' on a new host"
	}
	return fmt.Sprintf("anchor file %s: %v: %s; %s", e.Path, e.Err, e.Problem, fix)
}

// Unwrap returns the sentinel.
func (e *AnchorFileError) Unwrap() error { return e.Err }

// readAnchorFile reads and authenticates the anchor file.
func readAnchorFile(path, keyID string, key []byte) (anchorFile, error) {
	fh, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return anchorFile{}, &AnchorFileError{Path: path, Problem: "does not exist", Err: ErrAnchorNotInitialized}
	}
	if err != nil {
		return anchorFile{}, fmt.Errorf("read anchor file: %w", err)
	}
	defer fh.Close()
	b, err := io.ReadAll(io.LimitReader(fh, maxAnchorFile+1))
	if err != nil {
		return anchorFile{}, fmt.Errorf("read anchor file %s: %w", path, err)
	}
	return decodeAnchorFile(path, b, keyID, key)
}

func decodeAnchorFile(path string, b []byte, keyID string, key []byte) (anchorFile, error) {
	bad := func(err error, format string, a ...any) (anchorFile, error) {
		return anchorFile{}, &AnchorFileError{Path: path, Problem: fmt.Sprintf(format, a...), Err: err}
	}
	if len(b) == 0 {
		return bad(ErrCorrupt, "the file is empty")
	}
	if len(b) > maxAnchorFile {
		return bad(ErrCorrupt, "the file is larger than %d bytes", maxAnchorFile)
	}
	var f anchorFile
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&f); err != nil {
		return bad(ErrCorrupt, "not a valid anchor record (%v)", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return bad(ErrCorrupt, "trailing data after the record")
	}
	if f.Version != anchorFileVersion {
		return bad(ErrUnsupportedVersion, "version %d, this build reads %d", f.Version, anchorFileVersion)
	}
	if f.KeyID != keyID {
		return bad(ErrWrongKey, "authenticated by vault key %s, this host's vault key is %s (a file from another host or another vault)", f.KeyID, keyID)
	}
	want, err := f.mac(key)
	if err != nil {
		return bad(ErrCorrupt, "cannot be encoded: %v", err)
	}
	got, err := hex.DecodeString(f.MAC)
	wantB, _ := hex.DecodeString(want)
	if err != nil || !hmac.Equal(got, wantB) {
		return bad(ErrCorrupt, "its MAC does not verify (edited, forged or damaged)")
	}
	if err := checkFacts(Facts{Holdings: f.Holdings}); err != nil {
		return bad(ErrCorrupt, "holdings: %v", err)
	}
	return f, nil
}
