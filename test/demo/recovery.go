package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/hypervisor/libvirt"
	"github.com/vtpmm/vtpmm/test/guest"
	"github.com/vtpmm/vtpmm/test/lab"
)

// custodians writes three custodians' age identities (2 of 3 restore)
// and adds the escrow policy and backup directory to every host's vtpmd
// configuration, before the daemons start.
func (d *demo) custodians(t lab.T, f *lab.Fleet) *lab.Custodians {
	c, err := lab.NewCustodians(filepath.Join(f.Net.Dir, "custodians"), 2, "alice", "bob", "carol")
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range f.Order {
		if err := f.Hosts[name].Vtpmd.AppendConfig(c.Config(filepath.Join(f.Net.Dir, "backup"))); err != nil {
			t.Fatal(err)
		}
	}
	return c
}

// evacuation: two more VMs on host-a, then 'vtpmctl evacuate host-a' as
// before maintenance: host-c (tampered) is left out, both go to host-b.
func (d *demo) evacuation(ctx context.Context, t lab.T, f *lab.Fleet, a, b *lab.FleetHost) {
	d.say("Maintenance of host-a: two more VMs there (vtpmctl vm create; firmware-only, 128 MiB), then vtpmctl evacuate host-a --parallel 2")
	var vms []*lab.VM
	for _, name := range []string{"db-1", "db-2"} {
		vms = append(vms, f.CreateVM(ctx, a, name, libvirt.VMSpec{MemoryMiB: 128, TPMVersion: "2.0", TCG: !lab.KVM()}))
	}
	cmd, err := f.EvacuateCmd(ctx, a, "--parallel", "2")
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("vtpmctl evacuate host-a: %v\n%s", err, out)
	}
	d.detail("vtpmctl evacuate host-a --parallel 2 (%s): its progress lines and report:\n     %s", dur(time.Since(t0)), indent(string(out)))
	for _, vm := range vms {
		owner, report, err := f.Owner(ctx, vm)
		if err != nil || owner != b.Name {
			t.Fatalf("%s after the evacuation: owner %q, %v\n%s", vm.Name, owner, err, report)
		}
	}
	hi, err := f.HostInfo(ctx, b, a.Name)
	if err != nil || hi.State != "draining" {
		t.Fatalf("host-a after its evacuation: %+v, %v", hi, err)
	}
	d.detail("db-1 and db-2 run on host-b at generation 2, nothing pending; host-a is %s until 'vtpmctl host undrain host-a'", hi.State)
	f.Operator(ctx, "host", "undrain", a.Name)
	d.detail("maintenance done: vtpmctl host undrain host-a")
}

// tpmLoss: web-1's bundle is written on b (its owner); b loses power and
// its TPM; the operator retires it and restores web-1 onto a with 2 of
// the 3 custodians; the guest boots there and finds its secret.
func (d *demo) tpmLoss(ctx context.Context, t lab.T, f *lab.Fleet, c *lab.Custodians, vm *lab.VM, a, b *lab.FleetHost, secret string) {
	d.say("Disaster recovery: vtpmctl backup web-1 on %s (bundle for custodians alice, bob, carol; any 2 restore)", b.Name)
	rep, err := f.Backup(ctx, b, filepath.Join(f.Net.Dir, "backup"), vm.Name)
	if err != nil {
		t.Fatal(err)
	}
	bundle := rep.Items[0].Path
	d.detail("%s: %d bytes, generation %d, %d host TPM commands, %s", strings.TrimPrefix(bundle, f.Net.Dir+"/"), rep.Items[0].Bytes, rep.Items[0].Generation, rep.TPMCommands, dur(rep.Took))

	d.say("%s loses power (libvirtd, QEMU, vtpmd, host TPM SIGKILLed at once) and its TPM dies (state wiped); the operator retires it", b.Name)
	if err := b.PowerOff(); err != nil {
		t.Fatal(err)
	}
	if err := b.WipeTPM(); err != nil {
		t.Fatal(err)
	}
	var r lab.Result
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(time.Second) {
		if r, err = f.OperatorCtlOn(ctx, a, "host", "retire", b.Name); err == nil && r.Code == 0 {
			break
		}
		if err != nil || r.Code != 2 || time.Now().After(deadline) {
			t.Fatalf("vtpmctl host retire %s: %v %s", b.Name, err, r)
		}
	}
	d.detail("vtpmctl host retire %s (once its liveness lease expired):\n     %s", b.Name, indent(r.Stdout))

	d.say("vtpmctl restore BUNDLE --to %s with alice's and carol's identities (bob alone is refused), then virsh start web-1 on %s", a.Name, a.Name)
	xml, err := os.ReadFile(b.Path("/etc/libvirt/qemu/" + vm.Name + ".xml"))
	if err == nil {
		err = os.WriteFile(a.Path("/var/lib/libvirt/"+vm.Name+".xml"), xml, 0o600)
	}
	if err != nil {
		t.Fatal(err)
	}
	if out, _, err := a.Virsh(ctx, "define", "/var/lib/libvirt/"+vm.Name+".xml"); err != nil {
		t.Fatalf("virsh define on %s: %v %s", a.Name, err, out)
	}
	restore := func(ids ...string) (lab.Result, error) {
		return f.OperatorCtlOn(ctx, a, append([]string{"restore", bundle, "--to", a.Name}, c.IdentityArgs(ids...)...)...)
	}
	if r, err := restore("bob"); err != nil || r.Code != 2 {
		t.Fatalf("restore with bob alone: %v %s", err, r)
	} else {
		d.detail("bob alone: refused (exit 2): %s", firstLine(strings.TrimSpace(r.Stderr)))
	}
	var from int64 // where a's console log of web-1 ends (it ran there before)
	if st, err := os.Stat(a.Path(vm.Serial)); err == nil {
		from = st.Size()
	}
	t0 := time.Now()
	if r, err = restore("alice", "carol"); err != nil || r.Code != 0 {
		t.Fatalf("vtpmctl restore: %v %s", err, r)
	}
	if out, _, err := a.Virsh(ctx, "start", vm.Name); err != nil {
		t.Fatalf("virsh start web-1 on %s: %v %s", a.Name, err, out)
	}
	if dom, err := a.Hyp.Domain(ctx, vm.UUID); err != nil || dom.State != hypervisor.StateRunning {
		t.Fatalf("web-1 on %s: %q, %v", a.Name, dom.State, err)
	}
	d.detail("%s", indent(r.Stdout))
	d.detail("web-1 running on %s %s after the restore command", a.Name, dur(time.Since(t0)))

	d.say("The guest boots on %s, finds its sealed secret in the restored vTPM and unseals it", a.Name)
	con := waitBoot(ctx, t, a.Path(vm.Serial), from, 2, 3*time.Minute)
	if len(con.Found) != 1 || con.Found[0] != secret || len(con.Sealed) != 0 || len(con.Errors) != 0 {
		t.Fatalf("web-1 on %s: found %v, errors %v, want %s", a.Name, con.Found, con.Errors, secret)
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
	d.detail("%s", fmt.Sprintf("the same secret %s after the TPM loss; %s owns web-1 at generation %s, above every copy %s ever had",
		secret, a.Name, rows[vm.UUID].Gen, b.Name))
}

// waitBoot waits until the console log at path, read from byte from (or
// from its start if it is shorter now: QEMU truncated it), shows a boot and
// n unseal ticks, and returns that part parsed.
func waitBoot(ctx context.Context, t lab.T, path string, from int64, n int, limit time.Duration) *guest.Console {
	deadline := time.Now().Add(limit)
	for {
		b, _ := os.ReadFile(path)
		if int64(len(b)) >= from {
			b = b[from:]
		}
		c := guest.ParseConsole(b)
		if len(c.Boots) > 0 && len(c.Ticks) >= n {
			return c
		}
		if ctx.Err() != nil || time.Now().After(deadline) {
			t.Fatalf("no boot with %d unseal ticks in %s after %s: %s", n, path, limit, lab.Tail(string(b), 2000))
		}
		time.Sleep(250 * time.Millisecond)
	}
}
