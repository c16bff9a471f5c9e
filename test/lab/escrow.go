package lab

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"filippo.io/age"

	"github.com/vtpmm/vtpmm/internal/adminapi"
)

// Custodians are offline escrow custodians made for a lab run: an X25519
// age identity file per custodian, and the escrow policy (k of n) every
// host's vtpmd gets (Config).
type Custodians struct {
	Threshold int
	Names     []string
	// Files are the identity files by name (what each custodian brings to
	// a restore: 'vtpmctl restore --identity FILE').
	Files      map[string]string
	recipients map[string]string
}

// NewCustodians generates one age X25519 identity per name into dir
// (mode 0600), with threshold k.
func NewCustodians(dir string, k int, names ...string) (*Custodians, error) {
	c := &Custodians{Threshold: k, Names: names, Files: map[string]string{}, recipients: map[string]string{}}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	for _, n := range names {
		id, err := age.GenerateX25519Identity()
		if err != nil {
			return nil, err
		}
		p := filepath.Join(dir, n+".key")
		if err := os.WriteFile(p, []byte("# custodian "+n+"\n"+id.String()+"\n"), 0o600); err != nil {
			return nil, err
		}
		c.Files[n], c.recipients[n] = p, id.Recipient().String()
	}
	return c, nil
}

// Config is the escrow section of vtpmd.yaml, with backup.dir set to
// backupDir (Vtpmd.AppendConfig).
func (c *Custodians) Config(backupDir string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "escrow:\n  threshold: %d\n  custodians:\n", c.Threshold)
	for _, n := range c.Names {
		fmt.Fprintf(&b, "    - {name: %s, recipients: [%q]}\n", n, c.recipients[n])
	}
	fmt.Fprintf(&b, "backup:\n  dir: %s\n", backupDir)
	return b.String()
}

// IdentityArgs are the --identity flags of the named custodians.
func (c *Custodians) IdentityArgs(names ...string) []string {
	var out []string
	for _, n := range names {
		out = append(out, "--identity", c.Files[n])
	}
	return out
}

// Backup runs 'vtpmctl backup VM... -o DIR --json' on h's vtpmd and
// returns its report (an error unless every VM has a bundle).
func (f *Fleet) Backup(ctx context.Context, h *FleetHost, dir string, vms ...string) (adminapi.BackupReport, error) {
	var rep adminapi.BackupReport
	r, err := h.Vtpmd.Ctl(ctx, append(append([]string{"backup"}, vms...), "-o", dir, "--json")...)
	if err != nil {
		return rep, err
	}
	if jerr := json.Unmarshal([]byte(r.Stdout), &rep); jerr != nil || r.Code != 0 {
		return rep, fmt.Errorf("%s: vtpmctl backup: %v %s", h.Name, jerr, r)
	}
	return rep, nil
}
