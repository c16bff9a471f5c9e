package guest

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"debug/elf"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
)

// build runs Build once per test binary into DefaultDir (a warm cache makes
// it about a second).
var build = sync.OnceValues(func() (*Image, error) {
	log := logrus.New()
	log.SetLevel(logrus.WarnLevel)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	return Build(ctx, Config{Dir: DefaultDir(), Log: log})
})

func image(t *testing.T) *Image {
	t.Helper()
	start := time.Now()
	img, err := build()
	if err != nil {
		t.Fatalf("Build: %v", err)
	}
	t.Logf("Build: %v (cache %s)", time.Since(start).Round(time.Millisecond), DefaultDir())
	return img
}

// cpioEntry is one member of a newc archive, as read back by readNewc.
type cpioEntry struct {
	mode         uint32
	rmaj, rmin   uint32
	data         []byte // file contents or symlink target
	nlink, mtime uint32
}

// readNewc is a small independent newc reader: header magic, 13 hex
// fields, name and data padded to 4 bytes, up to TRAILER!!!.
func readNewc(t *testing.T, b []byte) (map[string]cpioEntry, []string) {
	t.Helper()
	entries := map[string]cpioEntry{}
	var order []string
	off := 0
	align := func(n int) int { return (n + 3) &^ 3 }
	for {
		if off+110 > len(b) {
			t.Fatalf("newc: truncated header at %d", off)
		}
		h := b[off : off+110]
		if string(h[:6]) != "070701" {
			t.Fatalf("newc: bad magic %q at %d", h[:6], off)
		}
		var f [13]uint32
		for i := range f {
			v, err := strconv.ParseUint(string(h[6+8*i:14+8*i]), 16, 32)
			if err != nil {
				t.Fatalf("newc: field %d at %d: %v", i, off, err)
			}
			f[i] = uint32(v)
		}
		size, namesize := int(f[6]), int(f[11])
		nameEnd := off + 110 + namesize
		if namesize == 0 || nameEnd > len(b) || b[nameEnd-1] != 0 {
			t.Fatalf("newc: bad name at %d", off)
		}
		name := string(b[off+110 : nameEnd-1])
		dataOff := align(nameEnd)
		if dataOff+size > len(b) {
			t.Fatalf("newc: %s: truncated data", name)
		}
		if name == "TRAILER!!!" {
			if rest := b[align(dataOff+size):]; len(bytes.Trim(rest, "\x00")) != 0 {
				t.Fatalf("newc: %d bytes after the trailer", len(rest))
			}
			return entries, order
		}
		if _, dup := entries[name]; dup {
			t.Fatalf("newc: %s twice", name)
		}
		entries[name] = cpioEntry{mode: f[1], nlink: f[4], mtime: f[5], rmaj: f[9], rmin: f[10], data: b[dataOff : dataOff+size]}
		order = append(order, name)
		off = align(dataOff + size)
	}
}

func checkStaticELF(t *testing.T, name string, data []byte) {
	t.Helper()
	f, err := elf.NewFile(bytes.NewReader(data))
	if err != nil {
		t.Fatalf("%s: not ELF: %v", name, err)
	}
	if f.Machine != elf.EM_X86_64 {
		t.Errorf("%s: machine %v", name, f.Machine)
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Errorf("%s: has PT_INTERP (dynamically linked)", name)
		}
	}
}

func TestBuild(t *testing.T) {
	img := image(t)
	if !strings.HasPrefix(img.KernelPackage, "linux-image-") || !strings.Contains(img.KernelPackage, "-cloud-amd64_") {
		t.Errorf("kernel package %q", img.KernelPackage)
	}
	k, err := os.ReadFile(img.Kernel)
	if err != nil {
		t.Fatal(err)
	}
	// A bzImage has the boot-protocol magic "HdrS" at 0x202.
	if len(k) < 1<<20 || string(k[0x202:0x206]) != "HdrS" {
		t.Errorf("kernel %s (%d bytes) is not a bzImage", img.Kernel, len(k))
	}
	gz, err := os.ReadFile(img.Initrd)
	if err != nil {
		t.Fatal(err)
	}
	zr, err := gzip.NewReader(bytes.NewReader(gz))
	if err != nil {
		t.Fatal(err)
	}
	raw, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("kernel %s: %d bytes; initrd: %d bytes gzip'd, %d bytes cpio", img.KernelPackage, len(k), len(gz), len(raw))
	ents, order := readNewc(t, raw)
	pos := map[string]int{}
	for i, n := range order {
		pos[n] = i
		if dir := filepath.Dir(n); dir != "." {
			if _, ok := pos[dir]; !ok {
				t.Errorf("%s comes before its directory %s", n, dir)
			}
		}
	}
	typ := func(name string) uint32 { return ents[name].mode & 0o170000 }
	if e, ok := ents["init"]; !ok || typ("init") != cpioFile || e.mode&0o111 == 0 || string(e.data) != initScript {
		t.Errorf("init: missing, not executable or not the init script")
	}
	for _, name := range []string{"bin/busybox", "bin/vtpmm-guest"} {
		e, ok := ents[name]
		if !ok || typ(name) != cpioFile || e.mode&0o111 == 0 {
			t.Fatalf("%s: missing or not an executable file", name)
		}
		checkStaticELF(t, name, e.data)
	}
	for _, name := range []string{"bin/sh", "bin/mount", "bin/sleep", "bin/mkdir"} {
		if e := ents[name]; typ(name) != cpioSymlink || string(e.data) != "/bin/busybox" {
			t.Errorf("%s: want a symlink to /bin/busybox, got mode %o -> %q", name, e.mode, e.data)
		}
	}
	if e := ents["dev/console"]; typ("dev/console") != cpioCharDev || e.rmaj != 5 || e.rmin != 1 {
		t.Errorf("dev/console: want char 5,1, got mode %o %d,%d", e.mode, e.rmaj, e.rmin)
	}
	for _, d := range []string{"proc", "sys", "dev", "tmp"} {
		if typ(d) != cpioDir {
			t.Errorf("%s: not a directory", d)
		}
	}

	// Cached: a second Build reuses the packages and is fast.
	start := time.Now()
	img2, err := Build(context.Background(), Config{Dir: DefaultDir()})
	if err != nil {
		t.Fatal(err)
	}
	if img2.Kernel != img.Kernel {
		t.Errorf("second Build: kernel %s, first %s", img2.Kernel, img.Kernel)
	}
	t.Logf("second Build: %v", time.Since(start).Round(time.Millisecond))
}

// swtpmForQEMU starts an swtpm that serves QEMU's tpm-emulator over a unix
// control socket, on the state in stateDir, and exits when QEMU disconnects.
func swtpmForQEMU(t *testing.T, stateDir string) string {
	t.Helper()
	sockDir, err := os.MkdirTemp("/tmp", "guest-swtpm-") // short: unix socket paths
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(sockDir) })
	sock := filepath.Join(sockDir, "swtpm.sock")
	cmd := exec.Command("swtpm", "socket", "--tpm2", "--terminate",
		"--ctrl", "type=unixio,path="+sock, "--tpmstate", "dir="+stateDir,
		"--log", "file="+filepath.Join(stateDir, "swtpm.log"))
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatalf("swtpm: %v", err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-done
	})
	for deadline := time.Now().Add(10 * time.Second); ; {
		if _, err := os.Stat(sock); err == nil {
			return sock
		}
		select {
		case <-done:
			t.Fatalf("swtpm exited: %s", out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("swtpm: no control socket after 10s: %s", out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// boot runs the guest under QEMU TCG with a CRB TPM backed by swtpm on
// stateDir until until(line) is true for a console line, then kills QEMU.
// It returns the console log.
func boot(t *testing.T, img *Image, stateDir string, timeout time.Duration, until func(elapsed time.Duration, line string) bool) []byte {
	t.Helper()
	sock := swtpmForQEMU(t, stateDir)
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "qemu-system-x86_64",
		"-machine", "q35", "-accel", "tcg", "-m", "256", "-smp", "1", "-nic", "none",
		"-nographic", "-no-reboot",
		"-kernel", img.Kernel, "-initrd", img.Initrd, "-append", Cmdline,
		"-chardev", "socket,id=chrtpm,path="+sock,
		"-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
		"-device", "tpm-crb,tpmdev=tpm0")
	pipe, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatalf("qemu: %v", err)
	}
	var log bytes.Buffer
	sc := bufio.NewScanner(pipe)
	ok := false
	for sc.Scan() {
		line := strings.TrimRight(sc.Text(), "\r")
		log.WriteString(line + "\n")
		if until(time.Since(start), line) {
			ok = true
			break
		}
	}
	_ = cmd.Process.Kill()
	_, _ = io.Copy(io.Discard, pipe)
	_ = cmd.Wait()
	if !ok {
		t.Fatalf("guest did not get there within %v (ctx: %v); console:\n%s", timeout, ctx.Err(), tailLines(log.String(), 40))
	}
	return log.Bytes()
}

func tailLines(s string, n int) string {
	l := strings.Split(strings.TrimSpace(s), "\n")
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return strings.Join(l, "\n")
}

func requireBootTools(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		t.Fatal("qemu-system-x86_64 is not installed; the guest boot test needs it: apt-get install -y --no-install-recommends qemu-system-x86")
	}
	if _, err := exec.LookPath("swtpm"); err != nil {
		t.Fatal("swtpm is not installed; the guest boot test needs it: apt-get install -y --no-install-recommends swtpm swtpm-tools")
	}
}

// TestBoot boots the guest for real (QEMU TCG, CRB TPM on swtpm): it seals
// a fresh secret to PCR 16 and unseals it every second; booted again on the
// same vTPM state, it finds and unseals the same secret.
func TestBoot(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a VM (about 15 s under TCG)")
	}
	requireBootTools(t)
	img := image(t)
	state := t.TempDir()
	want := ExpectedPCR16()

	var secret string
	marks := map[string]time.Duration{}
	log1 := boot(t, img, state, 3*time.Minute, func(el time.Duration, line string) bool {
		switch {
		case strings.Contains(line, "Run /init"):
			marks["init"] = el
		case strings.HasPrefix(line, "VTPMM-BOOT "):
			marks["boot"] = el
		case strings.HasPrefix(line, "VTPMM-SEALED "):
			marks["sealed"] = el
			secret = strings.TrimPrefix(line, "VTPMM-SEALED ")
		case strings.HasPrefix(line, "VTPMM-UNSEAL 2 "):
			marks["tick2"] = el
			return true
		}
		return false
	})
	t.Logf("first boot: /init at %v, PCR 16 extended at %v, sealed at %v, second unseal at %v",
		marks["init"].Round(10*time.Millisecond), marks["boot"].Round(10*time.Millisecond),
		marks["sealed"].Round(10*time.Millisecond), marks["tick2"].Round(10*time.Millisecond))
	c := ParseConsole(log1)
	if err := c.Verify(2); err != nil {
		t.Fatalf("%v; console:\n%s", err, tailLines(string(log1), 30))
	}
	if len(c.Sealed) != 1 || c.Sealed[0] != secret || len(c.Boots) != 1 || c.Boots[0] != want {
		t.Fatalf("first boot: sealed %q, boots %q (want PCR 16 %s)", c.Sealed, c.Boots, want)
	}

	// Power cycle: a new QEMU and swtpm on the same state. PCR 16 starts at
	// zero again and gets the same marker, so the sealed secret unseals.
	clear(marks)
	log2 := boot(t, img, state, 3*time.Minute, func(el time.Duration, line string) bool {
		switch {
		case strings.HasPrefix(line, "VTPMM-FOUND "):
			marks["found"] = el
		case strings.HasPrefix(line, "VTPMM-UNSEAL 1 "):
			marks["tick1"] = el
			return true
		}
		return false
	})
	t.Logf("second boot: found the secret at %v, first unseal at %v",
		marks["found"].Round(10*time.Millisecond), marks["tick1"].Round(10*time.Millisecond))
	c2 := ParseConsole(log2)
	if len(c2.Found) != 1 || c2.Found[0] != secret || len(c2.Sealed) != 0 || len(c2.Boots) != 1 || !strings.Contains(string(log2), "extended") {
		t.Fatalf("second boot: found %q sealed %q boots %q, want the first boot's secret %s; console:\n%s",
			c2.Found, c2.Sealed, c2.Boots, secret, tailLines(string(log2), 30))
	}
	// Both logs together, as a test reading a VM's logs on two hosts would.
	if err := ParseConsole(append(log1, log2...)).Verify(3); err != nil {
		t.Fatal(err)
	}
}

func TestParseConsole(t *testing.T) {
	t.Parallel()
	p := ExpectedPCR16()
	const s = "00112233445566778899aabbccddeeff"
	good := fmt.Sprintf("[    3.0] Run /init as init process\r\n"+
		"VTPMM-GUEST init: kernel 6.1\r\n"+
		"VTPMM-BOOT pcr16=%[1]s extended\r\n"+
		"VTPMM-SEALED %[2]s\r\n"+
		"VTPMM-UNSEAL 1 %[2]s pcr16=%[1]s\r\n"+
		"[   12.5] random: crng init done\r\nVTPMM-UNSEAL 2 %[2]s pcr16=%[1]s\r\n", p, s)
	c := ParseConsole([]byte(good))
	if c.Secret() != s || len(c.Ticks) != 2 || c.Ticks[1] != (Tick{N: 2, Secret: s, PCR16: p}) || len(c.Boots) != 1 {
		t.Fatalf("parsed %+v", c)
	}
	if err := c.Verify(2); err != nil {
		t.Errorf("Verify: %v", err)
	}
	if err := c.Verify(3); err == nil {
		t.Errorf("Verify(3) of 2 ticks passed")
	}
	for name, bad := range map[string]string{
		"unseal error": good + "VTPMM-UNSEAL 3 ERROR pcr16=" + p + " unseal: PCR policy not satisfied: PCR 16 differ from the sealed values\r\n",
		"pcr reset":    good + "VTPMM-UNSEAL 3 " + s + " pcr16=" + strings.Repeat("0", 64) + "\r\n",
		"other secret": good + "VTPMM-UNSEAL 3 ffff pcr16=" + p + "\r\n",
		"sealed twice": good + "VTPMM-SEALED ffff\r\n",
		"never sealed": "VTPMM-BOOT pcr16=" + p + " extended\r\nVTPMM-ERROR unseal: no sealed secret in this TPM\r\n",
		"boot pcr":     strings.Replace(good, "pcr16="+p+" extended", "pcr16=00 extended", 1),
	} {
		if err := ParseConsole([]byte(bad)).Verify(1); err == nil {
			t.Errorf("%s: Verify passed", name)
		} else {
			t.Logf("%s: %v", name, err)
		}
	}
	c = ParseConsole([]byte("VTPMM-UNSEAL 7 ERROR pcr16=? open TPM: no such device\n"))
	if len(c.Ticks) != 1 || c.Ticks[0] != (Tick{N: 7, PCR16: "?", Err: "open TPM: no such device"}) {
		t.Errorf("error tick parsed as %+v", c.Ticks)
	}
}

// TestKernelPackagePin: Config.KernelPackage wins, then $VTPMM_GUEST_KERNEL
// (apt is not asked: it would name another package).
func TestKernelPackagePin(t *testing.T) {
	for _, tc := range []struct{ cfg, env, want string }{
		{"linux-image-cfg-cloud-amd64", "linux-image-env-cloud-amd64", "linux-image-cfg-cloud-amd64"},
		{"", "linux-image-env-cloud-amd64", "linux-image-env-cloud-amd64"},
	} {
		t.Setenv(KernelPackageEnv, tc.env)
		b := &builder{cfg: Config{KernelPackage: tc.cfg}}
		got, err := b.kernelPackage(context.Background())
		if err != nil || got != tc.want {
			t.Errorf("cfg %q env %q: %q, %v; want %q", tc.cfg, tc.env, got, err, tc.want)
		}
	}
}
