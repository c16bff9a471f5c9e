package escrow

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/vtpmm/vtpmm/vtpm"
)

// Layout is the backup directory (backup.dir). It is the one place that
// knows the file names:
//
//	DIR/<vm-uuid>/<generation>-<UTC time>.vtpmbundle
//
// e.g. DIR/0e2e0e2e-0000-4000-8000-00000000d3e0/7-20261206T181200.123456789Z.vtpmbundle.
// Nobody else spells a bundle path.
type Layout struct {
	Dir string
}

// BundleExt is the extension of bundle files.
const BundleExt = ".vtpmbundle"

// timeLayout sorts lexically within one generation and has no ':' (which
// some file systems and tools dislike).
const timeLayout = "20060102T150405.000000000Z"

// VMDir is the directory of one VM's bundles.
func (l Layout) VMDir(vmID string) string { return filepath.Join(l.Dir, vmID) }

// BundleName is the file name of a bundle of generation gen sealed at t.
func BundleName(gen uint64, t time.Time) string {
	return strconv.FormatUint(gen, 10) + "-" + t.UTC().Format(timeLayout) + BundleExt
}

// BundlePath is where the bundle of vmID, generation gen, sealed at t lives.
func (l Layout) BundlePath(vmID string, gen uint64, t time.Time) string {
	return filepath.Join(l.VMDir(vmID), BundleName(gen, t))
}

// ParseBundleName reverses BundleName; ok is false for any other name
// (temporary files, foreign files), which are never touched.
func ParseBundleName(name string) (gen uint64, t time.Time, ok bool) {
	base, found := strings.CutSuffix(name, BundleExt)
	if !found {
		return 0, time.Time{}, false
	}
	g, ts, found := strings.Cut(base, "-")
	if !found || g == "" || g[0] == '0' {
		return 0, time.Time{}, false
	}
	gen, err := strconv.ParseUint(g, 10, 64)
	if err != nil {
		return 0, time.Time{}, false
	}
	t, err = time.Parse(timeLayout, ts)
	if err != nil || BundleName(gen, t) != name {
		return 0, time.Time{}, false
	}
	return gen, t, true
}

// BundleFile is one bundle found on disk.
type BundleFile struct {
	Path       string
	VMID       string
	Generation uint64
	Created    time.Time
}

// newer orders bundles newest first: higher generation, then later time.
func newer(a, b BundleFile) bool {
	if a.Generation != b.Generation {
		return a.Generation > b.Generation
	}
	return a.Created.After(b.Created)
}

// List returns a VM's bundles, newest first. A missing directory is an
// empty list.
func (l Layout) List(vmID string) ([]BundleFile, error) {
	if err := vtpm.CheckVMID(vmID); err != nil {
		return nil, fmt.Errorf("list bundles: %w", err)
	}
	ents, err := os.ReadDir(l.VMDir(vmID))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list bundles of %s: %w", vmID, err)
	}
	var out []BundleFile
	for _, e := range ents {
		if !e.Type().IsRegular() {
			continue
		}
		if gen, t, ok := ParseBundleName(e.Name()); ok {
			out = append(out, BundleFile{Path: filepath.Join(l.VMDir(vmID), e.Name()), VMID: vmID, Generation: gen, Created: t})
		}
	}
	sort.Slice(out, func(i, j int) bool { return newer(out[i], out[j]) })
	return out, nil
}

// VMs lists the VM directories present, sorted.
func (l Layout) VMs() ([]string, error) {
	ents, err := os.ReadDir(l.Dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list backup dir: %w", err)
	}
	var out []string
	for _, e := range ents {
		if e.IsDir() && vtpm.CheckVMID(e.Name()) == nil {
			out = append(out, e.Name())
		}
	}
	return out, nil
}
