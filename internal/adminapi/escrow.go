package adminapi

import (
	"context"
	"encoding/json"
	"net/http"
	"time"
)

// Paths of backup and restore (docs/escrow.md, docs/recovery.md).
const (
	PathBackup         = "/v1/backup"          // POST BackupRequest -> BackupReport
	PathRestoreAttest  = "/v1/restore/attest"  // POST RestoreAttestRequest -> RestoreAttestResponse
	PathRestorePrepare = "/v1/restore/prepare" // POST migrate.RestoreRequest -> migrate.PrepareResponse (JSON)
	PathRestoreFinish  = "/v1/restore/finish"  // POST RestoreFinishRequest -> migrate.FinishResponse
)

// BackupRequest asks vtpmd to write one escrow bundle per VM.
type BackupRequest struct {
	VMs []string `json:"vms,omitempty"` // names or UUIDs
	All bool     `json:"all,omitempty"` // every VM this host owns
	Dir string   `json:"dir,omitempty"` // default backup.dir
}

// BackupItem is one VM's bundle (or why it has none).
type BackupItem struct {
	UUID       string   `json:"uuid"`
	Name       string   `json:"name,omitempty"`
	Generation uint64   `json:"generation,omitempty"`
	Bundle     string   `json:"bundle,omitempty"` // the bundle's ID
	Path       string   `json:"path,omitempty"`
	Bytes      int      `json:"bytes,omitempty"`
	Removed    []string `json:"removed,omitempty"` // older bundles pruned (backup.keep)
	Error      string   `json:"error,omitempty"`
}

// BackupReport is the answer to POST PathBackup.
type BackupReport struct {
	Host  string       `json:"host"`
	Dir   string       `json:"dir"`
	Items []BackupItem `json:"items"`
	// TPMCommands are the host TPM commands counted while the backup ran
	// (0: the vault key is in memory; other work on the host may add).
	TPMCommands int           `json:"tpm_commands"`
	Took        time.Duration `json:"took"`
}

// Failed counts the VMs without a bundle.
func (r BackupReport) Failed() int {
	n := 0
	for _, it := range r.Items {
		if it.Error != "" {
			n++
		}
	}
	return n
}

// RestoreAttestRequest asks vtpmd to attest a restore's destination with
// its own policy, as a migration source does.
type RestoreAttestRequest struct {
	Host string `json:"host"`
}

// RestoreAttestResponse is the destination's verified migration key.
type RestoreAttestResponse struct {
	Source         string `json:"source"` // the attesting (relaying) host
	Dest           string `json:"dest"`
	MKPublic       []byte `json:"mk_public"`
	EvidenceDigest []byte `json:"evidence_digest"`
	Warm           bool   `json:"warm"` // evidence verified earlier was reused
}

// RestoreFinishRequest relays a Finish to a restore's destination; Finish
// is a migrate.FinishRequest (package adminapi is a leaf: it does not
// import migrate).
type RestoreFinishRequest struct {
	Dest   string          `json:"dest"`
	Finish json.RawMessage `json:"finish"`
}

// Backup asks vtpmd to write bundles.
func (c *Client) Backup(ctx context.Context, req BackupRequest) (BackupReport, error) {
	var out BackupReport
	return out, c.call(ctx, http.MethodPost, PathBackup, req, &out)
}

// RestoreAttest asks vtpmd to attest host for a restore.
func (c *Client) RestoreAttest(ctx context.Context, host string) (RestoreAttestResponse, error) {
	var out RestoreAttestResponse
	return out, c.call(ctx, http.MethodPost, PathRestoreAttest, RestoreAttestRequest{Host: host}, &out)
}

// RestorePrepare relays a restore's keys (wrapped for the destination's
// TPM) and states to the destination: req is a *migrate.RestoreRequest,
// out a *migrate.PrepareResponse (migrate/recovery wraps it typed).
func (c *Client) RestorePrepare(ctx context.Context, req, out any) error {
	return c.call(ctx, http.MethodPost, PathRestorePrepare, req, out)
}

// RestoreFinish relays the commit or abort of a restore; out is a
// *migrate.FinishResponse.
func (c *Client) RestoreFinish(ctx context.Context, req RestoreFinishRequest, out any) error {
	return c.call(ctx, http.MethodPost, PathRestoreFinish, req, out)
}
