// Command migsoak measures how often the lab's Linux guest loses memory or
// crashes across live migrations (see docs/libvirt.md, "TCG guests lose
// memory writes in live migrations"). It brings up two lab hosts
// (namespaces, libvirtd, QEMU, swtpm; no vtpmd), boots the end-to-end guest
// (test/guest, lab.LinuxSpec) on the first one, and live-migrates it back
// and forth -n times with the flags every vtpmm migration uses (virsh
// migrate --live --p2p --persistent --undefinesource). After each migration
// it watches the destination's serial console until the guest printed
// -dwell more unseal ticks, or an oops, a panic or a reboot appeared. A
// crashed guest reboots (panic=-1; one that only oopsed is reset) and the
// soak goes on with it; every crash is counted and its console saved under
// -out. With -memcheck N the guest also runs memcheck/ on N pages, and the
// migrations after which it found pages holding older contents are counted.
//
//	go run ./test/lab/cmd/migsoak -n 100 [-no-fix] [-memcheck 4096] [-load 2]
//	    [-cmdline pti=on] [-downtime MS] [-cpu max] [-out DIR]
//	    [-kernel-package linux-image-6.1.0-56-cloud-amd64]
//
// It prints one line per migration (wall time, libvirt's job, downtime,
// MiB sent and QEMU's number of dirty-bitmap syncs) and a summary:
//
//	migsoak: memcheck saw lost writes after 0/30 migrations
//	migsoak: 0/30 migrations crashed the guest, 0 failed (... syncs per migration map[3:30])
//
// Needs root and the lab's prerequisites (lab.Require), and runs from
// inside the vtpmm module. It is a diagnosis tool, not a test: run it alone
// on the machine when you want numbers.
package main

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/rand"
	"encoding/hex"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
	"libvirt.org/go/libvirtxml"

	"github.com/vtpmm/vtpmm/hypervisor/libvirt"
	"github.com/vtpmm/vtpmm/test/guest"
	"github.com/vtpmm/vtpmm/test/lab"
)

type options struct {
	n             int
	kernelPackage string
	cmdline       string
	cpu           string
	machine       string
	load          int
	dwell         int
	out           string
	keep          bool
	noTPM         bool
	memcheck      int
	downtime      int
	noFix         bool
}

func main() {
	var o options
	flag.IntVar(&o.n, "n", 100, "migrations")
	flag.StringVar(&o.kernelPackage, "kernel-package", "", "guest kernel package (default: what linux-image-cloud-amd64 depends on, or guest.PinnedKernelPackage when set)")
	flag.StringVar(&o.cmdline, "cmdline", "", "extra guest kernel command line (appended to guest.Cmdline)")
	flag.StringVar(&o.cpu, "cpu", "", "CPU model (<cpu mode='custom'><model>; empty: libvirt's default, qemu64)")
	flag.StringVar(&o.machine, "machine", "", "machine type (default q35)")
	flag.IntVar(&o.load, "load", 0, "busy-loop goroutines run alongside (extra CPU load on the host)")
	flag.IntVar(&o.dwell, "dwell", 2, "unseal ticks the guest must print on the destination before the next migration")
	flag.StringVar(&o.out, "out", "", "directory for the crash excerpts and the summary (default: a new /tmp/migsoak-*)")
	flag.BoolVar(&o.keep, "keep", false, "keep the lab directory")
	flag.BoolVar(&o.noTPM, "no-tpm", false, "no vTPM: the guest only waits for /dev/tpmrm0 (sleep 1 loop)")
	flag.IntVar(&o.downtime, "downtime", 0, "ms: set the source's maximum downtime (virsh migrate-setmaxdowntime) before each migration; 0 keeps QEMU's default (300 ms)")
	flag.BoolVar(&o.noFix, "no-fix", false, "boot the guest without lab.TCGMigrationMaxDowntime (QEMU's default downtime limit, as before the fix)")
	flag.IntVar(&o.memcheck, "memcheck", 0, "pages: also run memcheck on that many pages in the guest (a lost-write detector, see memcheck/) and count the migrations it flags; few pages stay in the TCG TLB, which is what the bug needs")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if o.out == "" {
		d, err := os.MkdirTemp("/tmp", "migsoak-")
		if err != nil {
			fmt.Fprintln(os.Stderr, "migsoak:", err)
			os.Exit(1)
		}
		o.out = d
	}
	if err := os.MkdirAll(o.out, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, "migsoak:", err)
		os.Exit(1)
	}
	summary, err := os.Create(filepath.Join(o.out, "migsoak.log"))
	if err != nil {
		fmt.Fprintln(os.Stderr, "migsoak:", err)
		os.Exit(1)
	}
	defer summary.Close()
	w := io.MultiWriter(os.Stdout, summary)
	err = lab.Run(ctx, w, func(t lab.T) { soak(ctx, t, o) })
	if err != nil {
		fmt.Fprintln(os.Stderr, "migsoak:", err)
		os.Exit(1)
	}
}

// crashRE matches what a crashing or rebooting guest kernel prints.
var crashRE = regexp.MustCompile(`(BUG: |Oops: |Kernel panic|general protection fault|kernel tried to execute|invalid opcode|double fault|RIP: 0010:|Linux version \S+ )`)

// bootRE matches the first line of a booting kernel.
var bootRE = regexp.MustCompile(`Linux version \S+ `)

func soak(ctx context.Context, t lab.T, o options) {
	img, err := guest.Build(ctx, guest.Config{Dir: guest.DefaultDir(), KernelPackage: o.kernelPackage, ModuleDir: moduleRoot(t)})
	if err != nil {
		t.Fatal(err)
	}
	quiet := logrus.New()
	quiet.SetOutput(io.Discard)
	n := lab.NewNetwork(ctx, t, lab.NetworkConfig{Prefix: "msoak", Keep: o.keep})
	hosts := []*lab.Host{
		lab.NewHost(ctx, t, lab.HostConfig{Network: n, Name: "host-a", IP: "10.251.0.1", Log: quiet}),
		lab.NewHost(ctx, t, lab.HostConfig{Network: n, Name: "host-b", IP: "10.251.0.2", Log: quiet}),
	}
	spec := lab.LinuxSpec(img)
	spec.Name, spec.UUID = "soak-1", lab.NewUUID()
	if o.noFix {
		spec.MigrationMaxDowntime = 0
	}
	spec.SerialLog = "/var/log/libvirt/qemu/soak-1-serial.log"
	spec.Cmdline = strings.TrimSpace(spec.Cmdline + " " + o.cmdline)
	if o.memcheck > 0 {
		spec.Initrd = memcheckInitrd(ctx, t, img.Initrd, n.Dir, o.memcheck)
		spec.Cmdline += " rdinit=/memcheck-init"
	}
	pass := make([]byte, 32)
	_, _ = rand.Read(pass)
	pass = []byte(hex.EncodeToString(pass))
	for _, h := range hosts {
		if err := h.Hyp.DefineSecret(ctx, spec.UUID, pass); err != nil {
			t.Fatal(err)
		}
	}
	doc := domainXML(t, spec, o)
	xmlPath := filepath.Join(n.Dir, "soak-1.xml")
	if err := os.WriteFile(xmlPath, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, _, err := hosts[0].Virsh(ctx, "define", xmlPath); err != nil {
		t.Fatalf("virsh define: %v: %s", err, out)
	}
	if out, _, err := hosts[0].Virsh(ctx, "start", spec.Name); err != nil {
		t.Fatalf("virsh start: %v: %s", err, out)
	}

	var spin atomic.Bool
	spin.Store(true)
	defer spin.Store(false)
	for i := 0; i < o.load; i++ {
		go func() {
			runtime.LockOSThread()
			x := 0
			for spin.Load() {
				x++
			}
		}()
	}

	cons := &consoles{hosts: hosts, path: spec.SerialLog, off: map[string]int{}}
	t.Logf("migsoak: kernel %s, cmdline %q, cpu %q, machine %q, load %d, tpm %v, downtime %d ms, domain's max downtime %v, dwell %d ticks, out %s",
		img.KernelPackage, spec.Cmdline, o.cpu, o.machine, o.load, !o.noTPM, o.downtime, spec.MigrationMaxDowntime, o.dwell, o.out)
	// Boot: wait for the guest to serve.
	if _, crash := cons.wait(ctx, hosts[0], o.dwell, o.noTPM, true, 3*time.Minute); crash != "" {
		t.Fatalf("guest crashed while booting:\n%s", crash)
	}
	var crashes, failed, lostMigrations int
	var walls []time.Duration
	syncs := map[uint64]int{} // libvirt's memory_iteration (QEMU's dirty-sync-count) -> migrations
	src, dst := hosts[0], hosts[1]
	for i := 1; i <= o.n && ctx.Err() == nil; i++ {
		if o.downtime > 0 {
			if out, _, err := src.Virsh(ctx, "migrate-setmaxdowntime", spec.Name, fmt.Sprint(o.downtime)); err != nil {
				t.Fatalf("virsh migrate-setmaxdowntime on %s: %v: %s", src.Name, err, out)
			}
		}
		srcOff := cons.size(src)
		cons.mark(dst)
		out, wall, err := src.Virsh(ctx, "migrate", "--live", "--p2p", "--persistent", "--undefinesource", spec.Name, "qemu+tcp://"+dst.IP+"/system")
		if err != nil {
			failed++
			t.Logf("migration %d %s->%s FAILED after %v: %v: %s", i, src.Name, dst.Name, wall.Round(time.Millisecond), err, strings.TrimSpace(out))
			if failed > 5 {
				t.Fatalf("too many failed migrations")
			}
			continue
		}
		walls = append(walls, wall)
		job, _ := dst.Hyp.CompletedJobStats(ctx, spec.UUID)
		syncs[job.MemIteration]++
		// The source's console after srcOff: a crash before switch-over.
		srcTail := cons.read(src, srcOff)
		ticks, crash := cons.wait(ctx, dst, o.dwell, o.noTPM, false, 90*time.Second)
		if crash == "" && crashed(srcTail, false) {
			crash = "(source console)\n" + srcTail
		}
		status := "ok"
		if o.memcheck > 0 && crash == "" {
			if lost := lostRE.FindAllString(cons.read(dst, cons.off[dst.Name]), -1); len(lost) > 0 {
				lostMigrations++
				status = fmt.Sprintf("LOST-WRITES(%d lines)", len(lost))
				t.Logf("  | %s", strings.Join(lost, "\n  | "))
			}
		}
		if crash != "" {
			crashes++
			status = "CRASH"
			f := filepath.Join(o.out, fmt.Sprintf("crash-%03d-%s-to-%s.txt", i, src.Name, dst.Name))
			_ = os.WriteFile(f, []byte(fmt.Sprintf("migration %d %s->%s wall %v job %+v\nsource tail:\n%s\ndestination:\n%s\n",
				i, src.Name, dst.Name, wall, job, lastBytes(srcTail, 4000), crash)), 0o644)
			t.Logf("%s", excerpt(crash))
		}
		t.Logf("migration %d %s->%s %s: wall %v, libvirt job %v, downtime %v, %.1f MiB, iterations %d, %d ticks after",
			i, src.Name, dst.Name, status, wall.Round(time.Millisecond), job.Elapsed, job.Downtime,
			float64(job.DataProcessed)/(1<<20), job.MemIteration, ticks)
		if crash != "" {
			// Let the rebooted guest serve again before migrating on:
			// watch its console from its (re)boot line on. An oops
			// that did not panic (a task killed, the guest hung)
			// leaves no reboot: reset the guest then.
			if !cons.markBoot(ctx, dst, 30*time.Second) {
				if out, _, err := dst.Virsh(ctx, "reset", spec.Name); err != nil {
					t.Fatalf("virsh reset on %s: %v: %s", dst.Name, err, out)
				}
				t.Logf("  (no reboot after the oops: guest reset)")
				cons.markBoot(ctx, dst, 3*time.Minute)
			}
			if _, again := cons.wait(ctx, dst, o.dwell, o.noTPM, true, 3*time.Minute); again != "" {
				t.Fatalf("guest crashed again after rebooting:\n%s", excerpt(again))
			}
		}
		src, dst = dst, src
	}
	var sum time.Duration
	for _, w := range walls {
		sum += w
	}
	mean := time.Duration(0)
	if len(walls) > 0 {
		mean = sum / time.Duration(len(walls))
	}
	if o.memcheck > 0 {
		t.Logf("migsoak: memcheck saw lost writes after %d/%d migrations", lostMigrations, len(walls))
	}
	t.Logf("migsoak: %d/%d migrations crashed the guest, %d failed (kernel %s, cmdline %q, cpu %q, machine %q, load %d, tpm %v, downtime %d ms, domain's max downtime %v; mean wall %v; syncs per migration %v)",
		crashes, len(walls), failed, img.KernelPackage, spec.Cmdline, o.cpu, o.machine, o.load, !o.noTPM, o.downtime, spec.MigrationMaxDowntime, mean.Round(time.Millisecond), syncs)
}

// domainXML is the lab's Linux guest domain, with the options applied.
func domainXML(t lab.T, spec libvirt.VMSpec, o options) string {
	doc, err := spec.DomainXML()
	if err != nil {
		t.Fatal(err)
	}
	var d libvirtxml.Domain
	if err := d.Unmarshal(doc); err != nil {
		t.Fatal(err)
	}
	if o.cpu != "" {
		d.CPU = &libvirtxml.DomainCPU{Mode: "custom", Match: "exact", Model: &libvirtxml.DomainCPUModel{Value: o.cpu, Fallback: "forbid"}}
	}
	if o.machine != "" {
		d.OS.Type.Machine = o.machine
	}
	if o.noTPM {
		d.Devices.TPMs = nil
	}
	doc, err = d.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	return doc
}

// consoles reads the guest's serial log on each host from an offset.
type consoles struct {
	hosts []*lab.Host
	path  string
	off   map[string]int
}

func (c *consoles) size(h *lab.Host) int {
	st, err := os.Stat(h.Path(c.path))
	if err != nil {
		return 0
	}
	return int(st.Size())
}

func (c *consoles) mark(h *lab.Host) { c.off[h.Name] = c.size(h) }

// markBoot waits until h's console shows a kernel boot line after its
// mark (the panic=-1 reboot) and moves the mark there.
func (c *consoles) markBoot(ctx context.Context, h *lab.Host, limit time.Duration) bool {
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		s := c.read(h, c.off[h.Name])
		if loc := bootRE.FindAllStringIndex(s, -1); len(loc) > 0 {
			c.off[h.Name] += loc[len(loc)-1][0]
			return true
		}
		time.Sleep(200 * time.Millisecond)
	}
	return false
}

func (c *consoles) read(h *lab.Host, off int) string {
	b, _ := os.ReadFile(h.Path(c.path))
	if off > len(b) {
		off = 0
	}
	return string(b[off:])
}

var tickRE = regexp.MustCompile(`VTPMM-UNSEAL \d+ [0-9a-f]+ `)

// wait waits for n unseal ticks (with noTPM: n seconds) on h's console
// after its mark, and returns their count, or the console text after the
// mark when it shows a crash or a reboot (then it waits a few seconds
// more, so that the whole oops is in the excerpt).
func (c *consoles) wait(ctx context.Context, h *lab.Host, n int, noTPM, booting bool, limit time.Duration) (int, string) {
	deadline := time.Now().Add(limit)
	start := time.Now()
	for {
		s := c.read(h, c.off[h.Name])
		if crashed(s, booting) {
			time.Sleep(3 * time.Second)
			return 0, c.read(h, c.off[h.Name])
		}
		ticks := len(tickRE.FindAllStringIndex(s, -1))
		if noTPM {
			ticks = int(time.Since(start) / time.Second)
		}
		if ticks >= n {
			return ticks, ""
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return ticks, fmt.Sprintf("(no crash message, but only %d ticks after %v)\n%s", ticks, limit, lastBytes(s, 4000))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// crashed reports whether the console text shows an oops, a panic or
// (unless the guest is booting) a reboot.
func crashed(s string, booting bool) bool {
	if booting {
		s = bootRE.ReplaceAllString(s, "")
	}
	return crashRE.MatchString(s)
}

// excerpt is the crash's first lines: what the kernel said went wrong.
func excerpt(s string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		l = strings.TrimRight(l, "\r")
		if crashRE.MatchString(l) || strings.Contains(l, "#PF") || strings.Contains(l, "Comm:") || strings.Contains(l, "CR2") {
			out = append(out, "  | "+l)
		}
		if len(out) >= 12 {
			break
		}
	}
	return strings.Join(out, "\n")
}

func lastBytes(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

func moduleRoot(t lab.T) string {
	root, err := lab.ModuleRoot()
	if err != nil {
		t.Fatal(err)
	}
	return root
}

var lostRE = regexp.MustCompile(`MEMCHECK LOST[^\r\n]*`)

// memcheckInitrd builds memcheck and returns the guest's initrd with a
// second archive appended (the kernel unpacks both): /bin/memcheck and
// /memcheck-init, which starts it on the console and execs /init.
func memcheckInitrd(ctx context.Context, t lab.T, initrd, dir string, pages int) string {
	bin := filepath.Join(dir, "memcheck")
	build := exec.CommandContext(ctx, "go", "build", "-trimpath", "-o", bin, "./test/lab/cmd/migsoak/memcheck")
	build.Dir = moduleRoot(t)
	build.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build memcheck: %v: %s", err, out)
	}
	mc, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	base, err := os.ReadFile(initrd)
	if err != nil {
		t.Fatal(err)
	}
	var extra bytes.Buffer
	zw := gzip.NewWriter(&extra)
	c := &cpio{w: zw}
	c.file("bin/memcheck", 0o755, mc)
	c.file("memcheck-init", 0o755, []byte(fmt.Sprintf("#!/bin/busybox sh\n/bin/memcheck -pages %d </dev/null >/dev/console 2>&1 &\nexec /init\n", pages)))
	c.trailer()
	if c.err != nil {
		t.Fatal(c.err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "initrd-memcheck.gz")
	if err := os.WriteFile(out, append(base, extra.Bytes()...), 0o644); err != nil {
		t.Fatal(err)
	}
	return out
}

// cpio writes a newc archive (regular files only).
type cpio struct {
	w   io.Writer
	ino int
	err error
}

func (c *cpio) entry(name string, mode uint32, data []byte) {
	if c.err != nil {
		return
	}
	c.ino++
	hdr := fmt.Sprintf("070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X",
		c.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name)+1, 0)
	b := append([]byte(hdr), name...)
	b = append(b, 0)
	b = append(b, make([]byte, (4-len(b)%4)%4)...)
	b = append(b, data...)
	b = append(b, make([]byte, (4-len(data)%4)%4)...)
	_, c.err = c.w.Write(b)
}

func (c *cpio) file(name string, perm uint32, data []byte) { c.entry(name, 0o100000|perm, data) }
func (c *cpio) trailer()                                   { c.entry("TRAILER!!!", 0, nil) }
