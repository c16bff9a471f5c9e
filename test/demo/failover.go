package main

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/test/lab"
)

// Failover (issue 15, docs/failover.md): web-1 runs on host-b with
// host-a as its standby; host-b loses power; host-a's vtpmd fences it with
// the lab's fence agent once its lease expired, promotes its replica and
// starts web-1 through libvirt; the guest finds its secret; host-b comes
// back, refuses its old copy and drops it.

// standbyConfig adds the standby section (the lab's fence agent,
// cmd/fence_lab, as every vtpmd's fence command) to every host's vtpmd
// configuration, before the daemons start.
func (d *demo) standbyConfig(ctx context.Context, t lab.T, f *lab.Fleet) {
	agent := filepath.Join(d.bin, "fence_lab")
	if _, err := lab.ModuleRoot(); err == nil {
		var berr error
		if agent, berr = lab.BuildFenceAgent(ctx, f.Net.Dir); berr != nil {
			t.Fatal(berr)
		}
	}
	for _, name := range f.Order {
		if err := f.Hosts[name].Vtpmd.AppendConfig(f.Net.StandbyYAML(agent, 3*time.Second, time.Minute)); err != nil {
			t.Fatal(err)
		}
	}
}

// failover: web-1 (on b) gets a as its standby, b loses power, a takes
// web-1 over by itself; b returns and refuses its copy.
func (d *demo) failover(ctx context.Context, t lab.T, f *lab.Fleet, vm *lab.VM, a, b *lab.FleetHost, secret string) {
	d.say("Failover: vtpmctl vm standby web-1 --on %s (on %s); %s knows web-1's domain (shared definition, shut off), and receives an attested replica", a.Name, b.Name, a.Name)
	if err := a.DefineFrom(ctx, b, vm); err != nil {
		t.Fatal(err)
	}
	if r, err := b.Vtpmd.Ctl(ctx, "vm", "standby", vm.Name, "--on", a.Name); err != nil || r.Code != 0 {
		t.Fatalf("vtpmctl vm standby: %v %s", err, r)
	}
	for deadline := time.Now().Add(2 * time.Minute); ; time.Sleep(250 * time.Millisecond) {
		r, rerr := a.Replica(vm)
		sum, serr := b.VTPMStateSHA256(vm)
		if rerr == nil && serr == nil && r != nil && string(r.Request.StateSHA256) == string(sum) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no current replica of web-1 on %s: %v %v", a.Name, rerr, serr)
		}
	}
	r, _ := b.Vtpmd.Ctl(ctx, "vm", "show", vm.Name)
	d.detail("vtpmctl vm show web-1 on %s:\n     %s", b.Name, indent(r.Stdout))
	d.detail("the replica: the VM key wrapped for %s's attested TPM and the vTPM state as it is at rest (encrypted); %s cannot start from it", a.Name, a.Name)

	d.say("%s loses power (libvirtd, QEMU, vtpmd, host TPM SIGKILLed at once); nobody acts: %s's vtpmd waits for %s's lease to expire, runs the fence agent, promotes, starts web-1", b.Name, a.Name, b.Name)
	var from int64 // where a's console log of web-1 ends (it ran there before)
	if st, err := os.Stat(a.Path(vm.Serial)); err == nil {
		from = st.Size()
	}
	t0 := time.Now()
	if err := b.PowerOff(); err != nil {
		t.Fatal(err)
	}
	for {
		dom, err := a.Hyp.Domain(ctx, vm.UUID)
		if err == nil && dom.State == hypervisor.StateRunning {
			break
		}
		if time.Since(t0) > 3*time.Minute {
			t.Fatalf("web-1 on %s 3 min after %s's power-off: %q, %v\n%s", a.Name, b.Name, dom.State, err, a.Vtpmd.LogTail(3000))
		}
		time.Sleep(100 * time.Millisecond)
	}
	running := time.Since(t0)
	fos, err := a.Vtpmd.WaitAutomaticFailovers(1, 30*time.Second)
	if err != nil || len(fos) != 1 {
		t.Fatalf("%s's automatic failovers: %+v, %v", a.Name, fos, err)
	}
	fo := fos[0]
	d.detail("web-1 running on %s %s after %s's power-off: lease expiry (TTL 5 s) until %s began %s, fence agent %s, promotion %s, start (secret, libvirt start through the hook) %s",
		a.Name, dur(running), b.Name, a.Name, dur(fo.Began.Sub(t0)), dur(fo.Fence), dur(fo.Promote), dur(fo.Start))
	log, err := adminapi.NewClient(a.Vtpmd.Socket).Audit(ctx, vm.UUID, "")
	if err == nil {
		for _, rec := range log.Records {
			if rec.Event == "host-fenced" || rec.Event == "failover-promoted" {
				d.detail("%s audit: %s %s: %s", a.Name, rec.Event, rec.Peer, rec.Detail)
			}
		}
	}

	d.say("The guest boots on %s, finds its sealed secret in the promoted vTPM and unseals it", a.Name)
	con := waitBoot(ctx, t, a.Path(vm.Serial), from, 2, 3*time.Minute)
	if len(con.Found) != 1 || con.Found[0] != secret || len(con.Sealed) != 0 || len(con.Errors) != 0 {
		t.Fatalf("web-1 on %s after the failover: found %v, errors %v, want %s", a.Name, con.Found, con.Errors, secret)
	}
	for _, tk := range con.Ticks {
		if tk.Secret != secret {
			t.Fatalf("web-1 on %s unsealed %+v, want %s", a.Name, tk, secret)
		}
	}
	d.console(f, vm, a, 3)
	rows, _, err := f.VMList(ctx, a)
	if err != nil {
		t.Fatal(err)
	}
	d.detail("the same secret %s; %s owns web-1 at generation %s", secret, a.Name, rows[vm.UUID].Gen)

	d.say("%s comes back (its vtpmd starts at boot): its old copy of web-1 may not start, and it drops it", b.Name)
	if err := b.PowerOn(ctx); err != nil {
		t.Fatal(err)
	}
	// vtpmd's start gate, asked as vtpmm's qemu hook asks it when libvirt
	// starts the domain ('prepare begin', the domain's XML on stdin).
	xml, err := os.ReadFile(b.Path("/etc/libvirt/qemu/" + vm.Name + ".xml"))
	if err != nil {
		t.Fatal(err)
	}
	hook := exec.CommandContext(ctx, f.Tools.Vtpmctl, "hook", "qemu", vm.Name, "prepare", "begin", "-", "--socket", b.Vtpmd.Socket)
	hook.Stdin = bytes.NewReader(xml)
	out, err := hook.CombinedOutput()
	if err == nil || !strings.Contains(string(out), "rule ") {
		t.Fatalf("the start gate on %s for its old copy of web-1: %v %s; want refused, naming the rule", b.Name, err, out)
	}
	d.detail("vtpmctl hook qemu web-1 prepare begin (what libvirt runs to start it) on %s: refused: %s", b.Name, hookReason(string(out)))
	bc := adminapi.NewClient(b.Vtpmd.Socket)
	for deadline := time.Now().Add(2 * time.Minute); ; time.Sleep(time.Second) {
		l, err := bc.Audit(ctx, vm.UUID, "stale-copy-shredded")
		if err == nil && len(l.Records) > 0 {
			d.detail("%s audit: stale-copy-shredded: %s", b.Name, l.Records[len(l.Records)-1].Detail)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s kept its stale copy of web-1: %v", b.Name, err)
		}
	}
	d.owner(ctx, t, f, vm, a, false)
}

// hookReason is the hook's refusal without vtpmctl's prefix.
func hookReason(out string) string {
	return firstLine(strings.TrimPrefix(strings.TrimSpace(out), "vtpmctl: "))
}
