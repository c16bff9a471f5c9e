package escrow

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"sort"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/internal/atomicfile"
	"github.com/vtpmm/vtpmm/vtpm"
)

// Retain applies the retention policy to one VM's bundles: keep the newest
// keep bundles (by generation, then time); whatever keep says, never drop
// the newest bundle of the current generation, nor any bundle of a
// generation above it (a newer owner's, which this host may not know
// about yet). currentGen 0 means "the highest generation present". It is
// a pure function: it returns what to keep and what to delete, both
// newest first.
func Retain(files []BundleFile, keep int, currentGen uint64) (kept, drop []BundleFile) {
	sorted := append([]BundleFile(nil), files...)
	sort.SliceStable(sorted, func(i, j int) bool { return newer(sorted[i], sorted[j]) })
	if currentGen == 0 && len(sorted) > 0 {
		currentGen = sorted[0].Generation
	}
	newestOfCurrent := -1
	for i, f := range sorted {
		if f.Generation == currentGen {
			newestOfCurrent = i
			break
		}
	}
	for i, f := range sorted {
		if i < keep || i == newestOfCurrent || f.Generation > currentGen {
			kept = append(kept, f)
		} else {
			drop = append(drop, f)
		}
	}
	return kept, drop
}

// Writer stores bundles in a Layout and prunes old ones. It is the small
// writer under the periodic backup (backup.interval, backup.dir); the
// scheduler lives in the daemon.
type Writer struct {
	Layout Layout
	Keep   int                // bundles kept per VM (at least 1)
	Log    logrus.FieldLogger // nil: no logging
}

// Write stores a sealed bundle as DIR/<vm>/<gen>-<time>.vtpmbundle, mode
// 0600 in directories of mode 0700: written to a temporary file, synced,
// then linked into place (never over an existing bundle:
// ErrBundleExists) and the directory synced. A crash leaves either no
// bundle or the whole one. The VM, generation and time come from the
// bundle's own header, so the name always agrees with the content.
func (w *Writer) Write(ctx context.Context, bundle []byte) (string, error) {
	if err := ctx.Err(); err != nil {
		return "", err
	}
	h, err := Inspect(bundle)
	if err != nil {
		return "", fmt.Errorf("write bundle: %w", err)
	}
	if w.Layout.Dir == "" {
		return "", fmt.Errorf("write bundle: %w: no backup directory", ErrBadRequest)
	}
	dir := w.Layout.VMDir(h.VM.UUID)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("write bundle: %w", err)
	}
	path := w.Layout.BundlePath(h.VM.UUID, h.Generation, h.Created)
	if err := atomicfile.WriteNew(path, bundle, 0o600); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return "", fmt.Errorf("write bundle of %s: %w: %s", h.VM.UUID, ErrBundleExists, path)
		}
		return "", fmt.Errorf("write bundle of %s: %w", h.VM.UUID, err)
	}
	return path, nil
}

// Prune deletes the VM's bundles that Retain drops and returns their
// paths. currentGen is the VM's generation as the caller knows it (0:
// the highest present).
func (w *Writer) Prune(ctx context.Context, vmID string, currentGen uint64) ([]string, error) {
	if err := vtpm.CheckVMID(vmID); err != nil {
		return nil, fmt.Errorf("prune bundles: %w", err)
	}
	keep := max(w.Keep, 1)
	files, err := w.Layout.List(vmID)
	if err != nil {
		return nil, err
	}
	_, drop := Retain(files, keep, currentGen)
	var removed []string
	for _, f := range drop {
		if err := ctx.Err(); err != nil {
			return removed, err
		}
		if err := os.Remove(f.Path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return removed, fmt.Errorf("prune bundles of %s: %w", vmID, err)
		}
		removed = append(removed, f.Path)
		if w.Log != nil {
			w.Log.WithFields(logrus.Fields{"vm": vmID, "gen": f.Generation, "path": f.Path}).Info("old escrow bundle removed")
		}
	}
	return removed, nil
}
