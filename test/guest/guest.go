// Package guest builds the Linux guest the end-to-end tests and the demo
// boot: the Debian cloud kernel (TPM TIS/CRB drivers built in) and a small
// initramfs with busybox and a static vtpmm-guest. The guest's /init mounts
// proc, sys and dev, waits for /dev/tpmrm0 and runs 'vtpmm-guest serve' on
// the serial console:
//
//	VTPMM-BOOT pcr16=<hex> extended|kept   PCR 16 gets BootMarker once per boot
//	VTPMM-SEALED <secret>                  first boot: a random secret sealed to PCR 16
//	VTPMM-FOUND <secret>                   later boots: the sealed secret unseals
//	VTPMM-UNSEAL <n> <secret> pcr16=<hex>  every second
//	VTPMM-UNSEAL <n> ERROR pcr16=<hex> <error>
//
// A test that reads the console log on whichever host the VM runs checks
// with ParseConsole and Console.Verify that the secret keeps unsealing after
// each live migration and that PCR 16 never reset.
//
// The packages are fetched with 'apt-get download' (never installed) and
// cached by package file in Config.Dir, so a second Build takes about a
// second (the go build of vtpmm-guest and the initramfs).
package guest

import (
	"bytes"
	"compress/gzip"
	"context"
	"debug/elf"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"

	"github.com/sirupsen/logrus"
)

// Sentinel errors of package guest. Match them with errors.Is.
var (
	// ErrPackages means a Debian package could not be resolved, downloaded
	// or read (apt-cache, apt-get download, dpkg-deb).
	ErrPackages = errors.New("guest packages unavailable")
	// ErrBuild means vtpmm-guest or the initramfs could not be built.
	ErrBuild = errors.New("guest build failed")
)

// Cmdline is the kernel command line the guest expects: its console on the
// first serial port (libvirt: <serial type='file'> or 'pty'), and a reboot
// instead of a hang on panic. Boot it under TCG (<domain type='qemu'>);
// the TPM may be tpm-crb or tpm-tis (both drivers are built in).
const Cmdline = "console=ttyS0 panic=-1"

// GuestPackage is the import path of the guest binary.
const GuestPackage = "github.com/vtpmm/vtpmm/cmd/vtpmm-guest"

// Config configures Build.
type Config struct {
	// Dir caches the downloaded packages and holds the built image
	// (required; DefaultDir is a good choice).
	Dir string
	// Log receives progress (default: discarded).
	Log logrus.FieldLogger
	// KernelPackage overrides the kernel package (default:
	// $VTPMM_GUEST_KERNEL, else what linux-image-cloud-amd64 depends on,
	// e.g. linux-image-6.1.0-57-cloud-amd64).
	KernelPackage string
	// GuestBinary is a prebuilt static vtpmm-guest (default: go build it).
	GuestBinary string
	// ModuleDir is where 'go build' runs (default: the working directory,
	// which must be inside the vtpmm module).
	ModuleDir string
}

// Image is a bootable guest: qemu -kernel Kernel -initrd Initrd
// -append "console=ttyS0".
type Image struct {
	Kernel string // vmlinuz
	Initrd string // gzip'd newc cpio
	// KernelPackage is the Debian package file the kernel came from.
	KernelPackage string
}

// DefaultDir is $VTPMM_GUEST_CACHE, or vtpmm/guest under the user's cache
// directory, or /var/tmp/vtpmm-guest.
func DefaultDir() string {
	if d := os.Getenv("VTPMM_GUEST_CACHE"); d != "" {
		return d
	}
	if d, err := os.UserCacheDir(); err == nil {
		return filepath.Join(d, "vtpmm", "guest")
	}
	return "/var/tmp/vtpmm-guest"
}

type builder struct {
	cfg     Config
	log     logrus.FieldLogger
	updated bool // apt-get update ran
}

// Build fetches the kernel and busybox (cached), builds vtpmm-guest and the
// initramfs, and returns their paths in cfg.Dir. Concurrent Builds on one
// Dir serialize on a lock file.
func Build(ctx context.Context, cfg Config) (*Image, error) {
	if cfg.Dir == "" {
		return nil, fmt.Errorf("%w: Config.Dir is empty", ErrBuild)
	}
	dir, err := filepath.Abs(cfg.Dir)
	if err != nil {
		return nil, err
	}
	cfg.Dir = dir
	b := &builder{cfg: cfg, log: cfg.Log}
	if b.log == nil {
		l := logrus.New()
		l.SetOutput(io.Discard)
		b.log = l
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	lock, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return nil, fmt.Errorf("lock %s: %w", lock.Name(), err)
	}
	return b.build(ctx)
}

func (b *builder) build(ctx context.Context) (*Image, error) {
	kpkg, err := b.kernelPackage(ctx)
	if err != nil {
		return nil, err
	}
	kdeb, err := b.fetch(ctx, kpkg)
	if err != nil {
		return nil, err
	}
	bdeb, err := b.fetch(ctx, "busybox-static")
	if err != nil {
		return nil, err
	}
	// Extracted files are named after their package file: a new package
	// version gets new files, an old one is reused.
	kernel := filepath.Join(b.cfg.Dir, "kernel", strings.TrimSuffix(filepath.Base(kdeb), ".deb")+".vmlinuz")
	if _, err := os.Stat(kernel); err != nil {
		if err := b.extract(ctx, kdeb, "./boot/vmlinuz-*", kernel); err != nil {
			return nil, err
		}
	}
	busybox := filepath.Join(b.cfg.Dir, "busybox", strings.TrimSuffix(filepath.Base(bdeb), ".deb")+".busybox")
	if _, err := os.Stat(busybox); err != nil {
		if err := b.extract(ctx, bdeb, "./bin/busybox", busybox); err != nil {
			return nil, err
		}
	}
	guestBin := b.cfg.GuestBinary
	if guestBin == "" {
		guestBin = filepath.Join(b.cfg.Dir, "vtpmm-guest")
		if err := b.goBuild(ctx, guestBin); err != nil {
			return nil, err
		}
	}
	initrd := filepath.Join(b.cfg.Dir, "initrd-vtpmm.gz")
	if err := b.initramfs(ctx, busybox, guestBin, initrd); err != nil {
		return nil, err
	}
	img := &Image{Kernel: kernel, Initrd: initrd, KernelPackage: filepath.Base(kdeb)}
	b.log.Infof("guest: kernel %s (from %s), initrd %s", img.Kernel, img.KernelPackage, img.Initrd)
	return img, nil
}

func (b *builder) goBuild(ctx context.Context, out string) error {
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", out, GuestPackage)
	cmd.Dir = b.cfg.ModuleDir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if o, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%w: CGO_ENABLED=0 go build %s (run inside the vtpmm module or set Config.ModuleDir): %v: %s",
			ErrBuild, GuestPackage, err, lastLines(string(o), 10))
	}
	return nil
}

// checkStatic refuses a dynamically linked binary: the initramfs has no
// libc and no loader.
func checkStatic(name string, data []byte) error {
	f, err := elf.NewFile(bytes.NewReader(data))
	if err != nil {
		return fmt.Errorf("%w: %s is not an ELF binary: %v", ErrBuild, name, err)
	}
	defer f.Close()
	if f.Machine != elf.EM_X86_64 {
		return fmt.Errorf("%w: %s is for %v, not x86-64", ErrBuild, name, f.Machine)
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return fmt.Errorf("%w: %s is dynamically linked (PT_INTERP)", ErrBuild, name)
		}
	}
	return nil
}

// initScript is the guest's /init (busybox sh, PID 1). It never exits: a
// PID 1 exit panics the kernel.
const initScript = `#!/bin/busybox sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /tmp
echo "VTPMM-GUEST init: kernel $(uname -r)"
i=0
while [ ! -c /dev/tpmrm0 ]; do
  i=$((i+1))
  if [ $i -ge 30 ]; then echo "VTPMM-ERROR no /dev/tpmrm0 after 30s: $(ls /dev | grep -i tpm)"; i=0; fi
  sleep 1
done
while :; do
  /bin/vtpmm-guest --tpm device:///dev/tpmrm0 serve --pcr 16 --interval 1s
  echo "VTPMM-ERROR vtpmm-guest serve exited with status $?"
  sleep 1
done
`

// initramfs writes the gzip'd newc cpio: busybox with its applet links,
// /init, /bin/vtpmm-guest, and /dev/console for the kernel's first console.
func (b *builder) initramfs(ctx context.Context, busybox, guestBin, out string) error {
	bb, err := os.ReadFile(busybox)
	if err != nil {
		return err
	}
	if err := checkStatic("busybox", bb); err != nil {
		return err
	}
	vg, err := os.ReadFile(guestBin)
	if err != nil {
		return err
	}
	if err := checkStatic("vtpmm-guest", vg); err != nil {
		return err
	}
	applets, err := b.applets(ctx, busybox)
	if err != nil {
		return err
	}
	var buf bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&buf, gzip.BestSpeed)
	w := &newcWriter{w: zw}
	for _, d := range []string{"bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "etc", "root"} {
		w.Dir(d)
	}
	w.CharDev("dev/console", 0o600, 5, 1)
	w.CharDev("dev/null", 0o666, 1, 3)
	w.File("bin/busybox", 0o755, bb)
	for _, a := range applets {
		w.Symlink(a, "/bin/busybox")
	}
	w.File("init", 0o755, []byte(initScript))
	w.File("bin/vtpmm-guest", 0o755, vg)
	w.File("etc/vtpmm-guest-marker", 0o644, []byte(BootMarker+"\n"))
	if err := w.Close(); err != nil {
		return fmt.Errorf("%w: initramfs: %v", ErrBuild, err)
	}
	if err := zw.Close(); err != nil {
		return fmt.Errorf("%w: initramfs: %v", ErrBuild, err)
	}
	if err := writeFileAtomic(out, &buf, 0o644); err != nil {
		return fmt.Errorf("%w: initramfs: %v", ErrBuild, err)
	}
	return nil
}

// applets lists busybox's applets as paths (bin/sh, sbin/ifconfig, ...),
// from the static binary itself.
func (b *builder) applets(ctx context.Context, busybox string) ([]string, error) {
	out, err := b.run(ctx, "", busybox, "--list-full")
	if err != nil {
		return nil, fmt.Errorf("%w: busybox --list-full: %v", ErrBuild, err)
	}
	var list []string
	for _, l := range strings.Fields(out) {
		l = strings.TrimPrefix(l, "/")
		if l == "" || l == "bin/busybox" || strings.Contains(l, "..") {
			continue
		}
		list = append(list, l)
	}
	slices.Sort(list)
	list = slices.Compact(list)
	if !slices.Contains(list, "bin/sh") {
		return nil, fmt.Errorf("%w: busybox has no sh applet", ErrBuild)
	}
	return list, nil
}

// run runs a command and returns its stdout (stderr on failure, appended).
func (b *builder) run(ctx context.Context, dir, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err != nil {
		return stdout.String() + stderr.String(), err
	}
	return stdout.String(), nil
}
