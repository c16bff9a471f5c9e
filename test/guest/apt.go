package guest

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
)

// KernelMetaPackage is the Debian package that depends on the current cloud
// kernel (TPM TIS/CRB drivers built in, no modules needed).
const KernelMetaPackage = "linux-image-cloud-amd64"

var kernelDep = regexp.MustCompile(`Depends:\s+(linux-image-[0-9][^\s]*-cloud-amd64)\b`)

// KernelPackageEnv names the environment variable that pins the guest
// kernel package when Config.KernelPackage is empty, e.g.
// VTPMM_GUEST_KERNEL=linux-image-6.1.0-57-cloud-amd64. A pin holds only
// while Debian's archive still serves that package (a superseded kernel
// ABI package is removed from it some weeks later).
const KernelPackageEnv = "VTPMM_GUEST_KERNEL"

// kernelPackage is Config.KernelPackage, or $VTPMM_GUEST_KERNEL, or what
// apt-cache says the meta package depends on now (running apt-get update
// once if the package lists do not know it yet).
func (b *builder) kernelPackage(ctx context.Context) (string, error) {
	if b.cfg.KernelPackage != "" {
		return b.cfg.KernelPackage, nil
	}
	if p := os.Getenv(KernelPackageEnv); p != "" {
		return p, nil
	}
	for attempt := 0; ; attempt++ {
		out, err := b.run(ctx, "", "apt-cache", "depends", KernelMetaPackage)
		if err == nil {
			if m := kernelDep.FindStringSubmatch(out); m != nil {
				return m[1], nil
			}
		}
		if attempt > 0 {
			// Offline with a warm cache: use the newest kernel package we have.
			if cached := b.cachedDebs("linux-image-*-cloud-amd64"); len(cached) > 0 {
				name, _, _ := strings.Cut(filepath.Base(cached[len(cached)-1]), "_")
				b.log.Warnf("guest: apt-cache cannot resolve %s (%v); using cached %s", KernelMetaPackage, err, name)
				return name, nil
			}
			return "", fmt.Errorf("%w: apt-cache depends %s names no linux-image-*-cloud-amd64 (%v): %s",
				ErrPackages, KernelMetaPackage, err, strings.TrimSpace(out))
		}
		if err := b.aptUpdate(ctx); err != nil {
			return "", err
		}
	}
}

func (b *builder) aptUpdate(ctx context.Context) error {
	if b.updated {
		return nil
	}
	b.log.Infof("guest: apt-get update (package lists are missing or stale)")
	if out, err := b.run(ctx, "", "apt-get", "update"); err != nil {
		return fmt.Errorf("%w: apt-get update: %v: %s", ErrPackages, err, lastLines(out, 5))
	}
	b.updated = true
	return nil
}

func (b *builder) cachedDebs(pkgGlob string) []string {
	m, _ := filepath.Glob(filepath.Join(b.cfg.Dir, "debs", pkgGlob+"_*.deb"))
	slices.Sort(m)
	return m
}

// fetch returns the .deb of pkg in Dir/debs, downloading it with
// 'apt-get download' (no installation) unless a file of that package is
// cached already.
func (b *builder) fetch(ctx context.Context, pkg string) (string, error) {
	if c := b.cachedDebs(pkg); len(c) > 0 {
		return c[len(c)-1], nil
	}
	debs := filepath.Join(b.cfg.Dir, "debs")
	if err := os.MkdirAll(debs, 0o755); err != nil {
		return "", err
	}
	tmp, err := os.MkdirTemp(debs, ".download-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(tmp)
	// _apt cannot write into root's private directories; apt then downloads
	// unsandboxed as root and says so on stderr.
	_ = os.Chmod(tmp, 0o755)
	for attempt := 0; ; attempt++ {
		out, err := b.run(ctx, tmp, "apt-get", "download", pkg)
		if err == nil {
			break
		}
		if attempt > 0 || b.updated {
			return "", fmt.Errorf("%w: apt-get download %s: %v: %s", ErrPackages, pkg, err, lastLines(out, 5))
		}
		// "Unable to locate package" or a 404 for an outdated list.
		if err := b.aptUpdate(ctx); err != nil {
			return "", err
		}
	}
	got, _ := filepath.Glob(filepath.Join(tmp, pkg+"_*.deb"))
	if len(got) != 1 {
		return "", fmt.Errorf("%w: apt-get download %s left %d .deb files", ErrPackages, pkg, len(got))
	}
	dst := filepath.Join(debs, filepath.Base(got[0]))
	if err := os.Rename(got[0], dst); err != nil {
		return "", err
	}
	if st, err := os.Stat(dst); err == nil {
		b.log.Infof("guest: downloaded %s (%d bytes)", filepath.Base(dst), st.Size())
	}
	return dst, nil
}

// extract copies the first file of deb whose path matches pattern (a
// path.Match pattern such as "./boot/vmlinuz-*") to dst, reading the
// package's file system with 'dpkg-deb --fsys-tarfile' (nothing is
// installed, and only the one file is written).
func (b *builder) extract(ctx context.Context, deb, pattern, dst string) error {
	cmd := exec.CommandContext(ctx, "dpkg-deb", "--fsys-tarfile", deb)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	pipe, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("%w: dpkg-deb: %v", ErrPackages, err)
	}
	found, xerr := extractTar(pipe, pattern, dst)
	_, _ = io.Copy(io.Discard, pipe)
	werr := cmd.Wait()
	switch {
	case xerr != nil:
		return fmt.Errorf("%w: %s: %v", ErrPackages, filepath.Base(deb), xerr)
	case werr != nil:
		return fmt.Errorf("%w: dpkg-deb --fsys-tarfile %s: %v: %s", ErrPackages, filepath.Base(deb), werr, strings.TrimSpace(stderr.String()))
	case !found:
		return fmt.Errorf("%w: %s holds no %s", ErrPackages, filepath.Base(deb), pattern)
	}
	return nil
}

func extractTar(r io.Reader, pattern, dst string) (bool, error) {
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return false, nil
		}
		if err != nil {
			return false, err
		}
		if ok, _ := path.Match(pattern, h.Name); !ok || h.Typeflag != tar.TypeReg {
			continue
		}
		return true, writeFileAtomic(dst, tr, 0o755)
	}
}

// writeFileAtomic writes r to path through a temporary file and a rename.
func writeFileAtomic(p string, r io.Reader, perm os.FileMode) error {
	if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	f, err := os.CreateTemp(filepath.Dir(p), "."+filepath.Base(p)+".tmp-")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if _, err := io.Copy(f, r); err != nil {
		f.Close()
		return err
	}
	if err := f.Chmod(perm); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), p)
}

func lastLines(s string, n int) string {
	l := strings.Split(strings.TrimSpace(s), "\n")
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return strings.Join(l, " | ")
}
