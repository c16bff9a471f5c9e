package main

import (
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/test/guest"
	"github.com/vtpmm/vtpmm/test/lab"
	"github.com/vtpmm/vtpmm/vtpm"
)

// live is part 2: three lab hosts with their own libvirtd and vtpmd; a
// Linux guest moves from host-a to host-b with 'vtpmctl migrate' and keeps
// unsealing its secret; host-c (tampered boot) is refused; host-a is
// evacuated (two more VMs, to host-b; host-c left out); host-b loses power
// and its standby host-a takes web-1 over (failover.go); host-a then loses
// power and its TPM, and the guest is restored from its escrow bundle onto
// host-b, where it unseals the same secret (recovery.go). Failures stop the
// demo through t (lab.Run cleans up).
func (d *demo) live(ctx context.Context, t lab.T) {
	d.part("Part 2: attested live migration on libvirt between three hosts")

	d.say("Build the Linux guest: Debian cloud kernel + busybox initramfs running 'vtpmm-guest serve'")
	img := d.guestImage(ctx, t)

	d.say("Operator set-up: mTLS CA, host certificates and the operator's registry certificate (vtpmctl pki init / issue), policy from the good boot log (vtpmctl eventlog golden)")
	specs := []lab.HostSpec{
		{Name: "host-a", IP: "10.251.0.1", BootLog: d.goodLog},
		{Name: "host-b", IP: "10.251.0.2", BootLog: d.goodLog},
		{Name: "host-c", IP: "10.251.0.3", BootLog: d.badLog},
	}
	f := lab.NewFleet(ctx, t, lab.FleetConfig{
		Network: lab.NetworkConfig{Prefix: "vdemo", Subreaper: d.subreaper(), Keep: d.keep},
		Tools:   lab.Tools{Vtpmd: filepath.Join(d.bin, "vtpmd"), Vtpmctl: filepath.Join(d.bin, "vtpmctl")},
		GoodLog: d.goodLog, Hosts: specs, Log: d.logger(), Registry: "embedded",
	})
	d.net = f.Net
	d.detail("lab directory %s; CA and certificates for host-a, host-b, host-c (by IP) and the operator (root, client only) in pki/", f.Net.Dir)
	d.detail("policy.yaml pins PCRs %s (sha256) and the boot log's rules, from %s", lab.QuotedPCRs, filepath.Base(d.goodLog))

	d.say("Three hosts, each with its own network, mount and UTS namespaces, libvirtd, host TPM and vtpmd (vtpmd init; registry: embedded)")
	for _, s := range specs {
		t0 := time.Now()
		h := f.AddHost(ctx, s.Name)
		pid, _ := os.ReadFile(filepath.Join(h.Dir, "libvirtd.pid"))
		d.detail("%s  %-10s netns %s, libvirtd pid %s, host TPM booted from %s; vtpmd init (%s)",
			h.Name, h.IP, h.Netns, strings.TrimSpace(string(pid)), filepath.Base(s.BootLog), dur(time.Since(t0)))
	}
	a, b, c := f.Hosts["host-a"], f.Hosts["host-b"], f.Hosts["host-c"]
	cust := d.custodians(t, f)
	d.standbyConfig(ctx, t, f)
	d.detail("escrow: custodians alice, bob, carol (age X25519 identities in custodians/), threshold 2, in every vtpmd.yaml")

	d.say("vtpmd run on every host (inside its namespaces): the fleet registry forms, a three-member etcd cluster with one member in each vtpmd")
	f.StartDaemons(ctx)
	r := f.Bootstrap(ctx)
	d.detail("vtpmctl registry bootstrap: %s", firstLine(r.Stdout))
	r = f.Operator(ctx, "registry", "members")
	d.detail("vtpmctl registry members:\n     %s", indent(r.Stdout))

	d.say("Enrol each host once for the whole fleet: vtpmctl host enroll HOST (EK chain + AK activation by host-a's vtpmd; the record goes to the registry, every host trusts it)")
	for _, h := range f.Order {
		r := f.EnrollOnce(ctx, h)
		lines := strings.SplitN(r.Stdout, "\n", 3)
		d.detail("%s", lines[0])
		if len(lines) > 1 {
			d.detail("%s", strings.TrimSpace(lines[1]))
		}
	}
	d.detail("3 enrolments for 3 hosts (without the registry: 6, one per pair)")
	r = f.Ctl(ctx, "host", "list", "--socket", a.Vtpmd.Socket)
	d.detail("vtpmctl host list:\n     %s", indent(r.Stdout))

	d.say("host-a: vtpmctl vm create web-1 (key, encrypted vTPM state, the registry's record, the libvirt secret); libvirt starts it (TCG, 256 MiB, TPM 2.0)")
	vm := f.CreateVM(ctx, a, "web-1", lab.LinuxSpec(img))
	d.detail("VM key generation %d, in host-a's vault only; vTPM state encrypted with it; libvirt secret %s (ephemeral, private)",
		vm.Generation, hypervisor.SecretUUID(vm.UUID))
	d.detail("web-1 (%s) is booting on host-a", vm.UUID)
	d.fleetList(ctx, t, f, a, "before the migration")

	d.say("The guest seals a random secret in its vTPM (SRK + PCR 16 policy) and unseals it every second; host-a's console:")
	f.WaitTicks(ctx, vm, a.Name, 0, 2, 3*time.Minute)
	secret := f.VerifyConsole(vm, 2)
	d.console(f, vm, a, 4)

	d.say("vtpmctl migrate web-1 --to host-b (on host-a): registry begin, attest host-b, wrap the key for its TPM, libvirt live migration, registry commit, finish")
	m := f.Migrate(ctx, vm, a, b)
	d.detail("%s", indent(m.Stdout))
	if m.JobErr == nil {
		d.detail("wall %s; libvirt job %s, downtime %s, %.1f MiB sent", dur(m.Wall), dur(m.Job.Elapsed), dur(m.Job.Downtime), float64(m.Job.DataProcessed)/(1<<20))
	}

	d.say("On host-b the guest keeps unsealing the same secret: no reboot, its PCR chain continues")
	f.WaitTicks(ctx, vm, b.Name, 0, 3, time.Minute)
	if s := f.VerifyConsole(vm, 2); s != secret {
		t.Fatalf("the guest unseals %s on host-b, it sealed %s", s, secret)
	}
	_, per := f.Console(vm)
	lastA, firstB := lab.LastTick(per[a.Name]), per[b.Name].Ticks[0].N
	if firstB <= lastA {
		t.Fatalf("first tick on host-b is %d, the last on host-a was %d: the guest restarted", firstB, lastA)
	}
	d.console(f, vm, b, 3)
	d.detail("same secret %s; ticks go on (#%d last on host-a, #%d first on host-b); one boot; PCR 16 = %s… on every tick",
		secret, lastA, firstB, guest.ExpectedPCR16()[:16])
	d.owner(ctx, t, f, vm, b, true)
	d.fleetList(ctx, t, f, b, "after the migration")

	d.say("vtpmctl migrate web-1 --to host-c (on host-b; host-c booted a tampered chain)")
	t0 := time.Now()
	r, err := b.Vtpmd.Ctl(ctx, "migrate", vm.Name, "--to", c.Name)
	if err != nil || r.Code != 2 {
		t.Fatalf("vtpmctl migrate web-1 --to host-c was not refused with exit 2: %v %s", err, r)
	}
	d.detail("refused (exit 2) in %s: %s", dur(time.Since(t0)), strings.TrimSpace(r.Stderr))
	if !strings.Contains(r.Stderr, "rule ") {
		t.Fatalf("the refusal names no rule: %s", r.Stderr)
	}

	d.say("After the refusal: web-1 keeps running on host-b; host-c received nothing")
	n := len(per[b.Name].Ticks)
	f.WaitTicks(ctx, vm, b.Name, n, 2, time.Minute)
	f.VerifyConsole(vm, 2)
	d.console(f, vm, b, 2)
	d.owner(ctx, t, f, vm, b, false)
	d.nothingOn(ctx, t, c, vm)

	d.evacuation(ctx, t, f, a, b)
	d.failover(ctx, t, f, vm, a, b, secret)
	d.tpmLoss(ctx, t, f, cust, vm, b, a, secret) // web-1 is on host-a now: host-a loses its TPM, web-1 is restored onto host-b

	d.say("The audit trail on host-b: vtpmctl audit")
	r, err = b.Vtpmd.Ctl(ctx, "audit")
	if err != nil || r.Code != 0 {
		t.Fatalf("vtpmctl audit on host-b: %v %s", err, r)
	}
	d.detail("%s", indent(r.Stdout))

	d.say("G1 check on all three hosts: no VM key, in any encoding, in any file or log of vtpmd, libvirt, QEMU or swtpm, nor in the backup bundle")
	d.scanLab(ctx, t, f, b)
}

// guestImage builds the guest (cached: about a second; the first run
// downloads the kernel and busybox packages with apt-get download).
// Inside the module it builds vtpmm-guest itself, like the e2e tests, so
// that both make the same initramfs in the shared cache.
func (d *demo) guestImage(ctx context.Context, t lab.T) *guest.Image {
	cfg := guest.Config{Dir: guest.DefaultDir(), Log: d.logger()}
	if root, err := lab.ModuleRoot(); err == nil {
		cfg.ModuleDir = root
	} else {
		cfg.GuestBinary = filepath.Join(d.bin, "vtpmm-guest")
	}
	img, err := guest.Build(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	d.detail("kernel %s (from %s)", img.Kernel, img.KernelPackage)
	d.detail("initramfs %s (busybox, static vtpmm-guest)", img.Initrd)
	return img
}

// subreaper is a prebuilt subreaper in the bin directory, or "" (the lab
// builds it).
func (d *demo) subreaper() string {
	p := filepath.Join(d.bin, "subreaper")
	if _, err := os.Stat(p); err != nil {
		return ""
	}
	return p
}

// logger sends logs (libvirt, guest build) to the demo's log file.
func (d *demo) logger() logrus.FieldLogger {
	l := logrus.New()
	l.SetOutput(d.log)
	return l
}

var pcrHex = regexp.MustCompile(`pcr16=([0-9a-f]{12})[0-9a-f]+`)

// console prints the last n VTPMM lines of the guest's console on h.
func (d *demo) console(f *lab.Fleet, vm *lab.VM, h *lab.FleetHost, n int) {
	b, _ := os.ReadFile(h.Path(vm.Serial))
	var lines []string
	for _, l := range strings.Split(string(b), "\n") {
		if i := strings.Index(l, "VTPMM-"); i >= 0 {
			lines = append(lines, pcrHex.ReplaceAllString(strings.TrimRight(l[i:], "\r"), "pcr16=$1…"))
		}
	}
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	for _, l := range lines {
		d.detail("%s console | %s", h.Name, l)
	}
}

// owner checks that host h alone owns and runs the VM and has its libvirt
// secret, and prints that (with the hosts' 'vtpmctl vm list' if lists).
func (d *demo) owner(ctx context.Context, t lab.T, f *lab.Fleet, vm *lab.VM, h *lab.FleetHost, lists bool) {
	owner, report, err := f.Owner(ctx, vm)
	if err != nil || owner != h.Name {
		t.Fatalf("owner of %s: %q, want %s: %v\n%s", vm.Name, owner, h.Name, err, report)
	}
	rows, _, err := f.VMList(ctx, h)
	if err != nil {
		t.Fatal(err)
	}
	d.detail("only %s owns (generation %s), runs web-1 and holds its libvirt secret; no other host holds its key", h.Name, rows[vm.UUID].Gen)
	if lists {
		d.detail("vtpmctl vm list on each host:\n     %s", indent(report))
	}
}

// nothingOn checks that the refused host has no secret, no domain, no
// key file and no VM in vtpmd for vm.
func (d *demo) nothingOn(ctx context.Context, t lab.T, c *lab.FleetHost, vm *lab.VM) {
	if has, err := c.Hyp.HasSecret(ctx, vm.UUID); err != nil || has {
		t.Fatalf("libvirt secret of web-1 on %s: %v %v", c.Name, has, err)
	}
	if dom, err := c.Hyp.Domain(ctx, vm.UUID); err != nil || dom.State != hypervisor.StateAbsent {
		t.Fatalf("web-1 on %s: %v %v", c.Name, dom.State, err)
	}
	if files, _ := filepath.Glob(filepath.Join(c.Vtpmd.DataDir, "keys", vm.UUID+"*")); len(files) != 0 {
		t.Fatalf("%s holds key files of web-1: %v", c.Name, files)
	}
	d.detail("%s: no libvirt secret, no domain, no key file for web-1", c.Name)
}

// scanLab stops h's vtpmd (the VM keeps running under libvirt), opens
// its vault to take the VM keys, and searches every file of the lab
// (every host's vtpmd data and logs, libvirt's and swtpm's directories
// and logs, the guest consoles, the host TPMs) and the demo's own files.
func (d *demo) scanLab(ctx context.Context, t lab.T, f *lab.Fleet, h *lab.FleetHost) {
	if err := h.Vtpmd.Stop(); err != nil {
		t.Fatal(err)
	}
	d.detail("vtpmd on %s stopped to open its vault here (web-1 keeps running under libvirt)", h.Name)
	var n, files int
	err := h.Vtpmd.WithKeys(ctx, func(keys *vtpm.KeyStore) error {
		fs, k, err := keyForms(ctx, keys)
		if err != nil {
			return err
		}
		defer fs.wipe()
		n = k
		files, err = fs.scan(f.Net.Dir, d.work)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if n == 0 {
		t.Fatalf("no VM key on %s", h.Name)
	}
	d.detail("%d VM key(s) x %d encodings searched in %d files: every host's vtpmd data and logs, libvirt's /etc, /run, /var/lib and /var/log", n, len(keyEncodings), files)
	d.detail("(swtpm state and logs, QEMU logs, guest consoles), host TPMs, PKI, and the demo's own files: none found")
}

// fleetList prints 'vtpmctl vm list --fleet' on h: the registry's view,
// the same from every host (h knows the VM's name: the registry does not
// keep names).
func (d *demo) fleetList(ctx context.Context, t lab.T, f *lab.Fleet, h *lab.FleetHost, when string) {
	r, err := h.Vtpmd.Ctl(ctx, "vm", "list", "--fleet")
	if err != nil || r.Code != 0 {
		t.Fatalf("vtpmctl vm list --fleet on %s: %v %s", h.Name, err, r)
	}
	d.detail("vtpmctl vm list --fleet on %s, %s:\n     %s", h.Name, when, indent(r.Stdout))
}
