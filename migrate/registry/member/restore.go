package member

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"

	"go.etcd.io/etcd/etcdutl/v3/snapshot"

	"github.com/vtpmm/vtpmm/migrate/registry"
)

// DefaultRevisionBump is how far Restore raises the restored revision by
// default: far above any revision the hosts saw, so that their watches and
// last views (View.Rev) never see the registry's revision go back.
const DefaultRevisionBump = 1 << 30

// RestoreOptions configures Restore.
type RestoreOptions struct {
	// RevisionBump raises the restored revision (default
	// DefaultRevisionBump); the revisions below it are marked compacted.
	RevisionBump uint64
}

// Restore builds this member's data directory (cfg.Embedded.DataDir,
// which must not exist yet) from a snapshot written by registry's
// Snapshot, for the
// members in cfg.Embedded.Members: the same as etcdutl snapshot restore.
// Run it on every member host, with vtpmd stopped, then start them all.
// Records, users and roles come back as they were at the snapshot; what
// changed since is settled by the hosts (docs/registry.md, "A restore
// older than the hosts' state").
func Restore(snapshotPath string, in registry.Config, opts RestoreOptions) error {
	if in.Mode != registry.ModeEmbedded {
		return fmt.Errorf("registry restore: %w: only embedded members are restored here (use etcdutl for an external cluster)", registry.ErrConfig)
	}
	cfg, err := in.WithDefaults()
	if err != nil {
		return err
	}
	em := cfg.Embedded
	if _, err := os.Stat(em.DataDir); !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("registry restore: data dir %s: %w (restore into a new directory)", em.DataDir, registry.ErrExists)
	}
	if opts.RevisionBump == 0 {
		opts.RevisionBump = DefaultRevisionBump
	}
	initial := make([]string, 0, len(em.Members))
	for _, m := range em.Members {
		initial = append(initial, m.Name+"="+m.PeerURL)
	}
	err = snapshot.NewV3(registry.ZapLogger(cfg.Log, "warn")).Restore(snapshot.RestoreConfig{
		SnapshotPath:        snapshotPath,
		Name:                em.Name,
		OutputDataDir:       em.DataDir,
		PeerURLs:            []string{em.Self().PeerURL},
		InitialCluster:      strings.Join(initial, ","),
		InitialClusterToken: em.ClusterToken,
		RevisionBump:        opts.RevisionBump,
		MarkCompacted:       true,
	})
	if err != nil {
		return fmt.Errorf("registry restore from %s: %w", snapshotPath, err)
	}
	return os.Chmod(em.DataDir, 0o700)
}
