package soak

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"time"

	"filippo.io/age"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/migrate/escrow"
	"github.com/vtpmm/vtpmm/migrate/recovery"
	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/migrate/registry/operator"
)

// The restore op (issue #14 in a schedule): the host that runs a VM
// backs up every VM it owns to the custodians (vtpmctl backup --all),
// then loses its TPM (inproc.Host.LoseTPM: its vtpmd, its registry
// member and its VMs die, its vault is gone for good). The operator
// retires it once its lease is gone, restores each VM it owned from its
// bundle onto another host with 2 of the 3 custodians (vtpmctl restore:
// recovery.Restorer), and starts it there; then brings the host back on
// a new TPM (ReplaceTPM, vtpmctl host reenroll). A restored VM's old
// copy on the returned host must not start (rule restore-old-copy).

// custodians are the schedule's three offline custodians (k = 2).
type custodians struct {
	cfg escrow.Config
	ids []*escrow.Identity // alice's and carol's: enough to restore
	dir string             // the bundles
}

func newCustodians() (*custodians, error) {
	dir, err := os.MkdirTemp("", "soak-backup-")
	if err != nil {
		return nil, err
	}
	c := &custodians{cfg: escrow.Config{Threshold: 2}, dir: dir}
	for _, name := range []string{"alice", "bob", "carol"} {
		id, err := age.GenerateX25519Identity()
		if err != nil {
			return nil, err
		}
		c.cfg.Custodians = append(c.cfg.Custodians, escrow.CustodianConfig{Name: name, Recipients: []string{id.Recipient().String()}})
		if name == "bob" {
			continue
		}
		ids, err := escrow.ParseIdentities(name, strings.NewReader(id.String()+"\n"), nil)
		if err != nil {
			return nil, err
		}
		c.ids = append(c.ids, ids...)
	}
	return c, nil
}

func (c *custodians) close() { _ = os.RemoveAll(c.dir) }

// drawRestore applies when every host runs and no link is cut (the lost
// host's member goes with it: the two others keep the quorum), and no
// host was lost before.
func drawRestore(s *Schedule) (Step, bool) {
	if len(s.upHosts()) < len(Hosts) || len(s.lost) > 0 || len(s.cutLinks()) > 0 {
		return Step{}, false
	}
	return Step{Kind: "restore", VM: s.rng.IntN(len(s.vms)), Hop: 1 + s.rng.IntN(len(Hosts)-1)}, true
}

// lostHost is what the operator has of a host that lost its TPM: the
// bundles of its VMs, its old EK, where to restore them, and which it
// restored.
type lostHost struct {
	bundles  map[string]string // VM -> bundle path
	oldEK    string
	dest     string
	call     int64 // when the loss began (the history's moves)
	restored []string
}

func runRestore(ctx context.Context, s *Schedule, st Step) string {
	vm := s.vms[st.VM]
	lost := s.runningOn(ctx, vm.VM)
	if lost == "" || s.down[lost] {
		return "skipped: the VM runs on no single live host"
	}
	h := s.f.InProcHost(lost)
	bk, err := h.Admin().Backup(ctx, adminapi.BackupRequest{All: true, Dir: s.custodians.dir})
	if err != nil || bk.Failed() > 0 {
		return fmt.Sprintf("skipped: backup on %s: %v (%d failed)", lost, err, bk.Failed())
	}
	lh := &lostHost{bundles: map[string]string{}, dest: Hosts[(slices.Index(Hosts, lost)+st.Hop)%len(Hosts)]}
	for _, it := range bk.Items {
		lh.bundles[it.UUID] = it.Path
	}
	if hv, err := s.f.Operator().Hosts(ctx, lost); err == nil && hv.Hosts[lost].Host != nil {
		lh.oldEK = hv.Hosts[lost].Host.Identity.EK
	}
	lh.call = s.lin.now()
	s.lost[lost] = lh
	s.down[lost] = true
	if err := h.LoseTPM(ctx); err != nil {
		return outcome(err, "lose "+lost+"'s TPM")
	}
	// A TPM is not replaced without a power cycle, which drops the
	// hypervisor's ephemeral vTPM secrets (libvirt's are ephemeral and
	// private); inproc's LoseTPM keeps the fake's.
	for _, v := range s.vms {
		_ = h.Fake().UndefineSecret(ctx, v.UUID)
	}
	s.hist.Faults["tpm-lost"]++
	return fmt.Sprintf("%s lost its TPM (%d bundles); %s", lost, len(bk.Items), s.recoverLost(ctx, lost))
}

// recoverLost does the operator's part after a TPM loss: retire the host
// once its lease is gone, restore each VM it owned onto the chosen host,
// then bring it back on a new TPM. What fails (no quorum) is tried again
// at the end of the schedule, after the heal.
func (s *Schedule) recoverLost(ctx context.Context, lost string) string {
	lh := s.lost[lost]
	op := s.f.Operator()
	var ret recovery.RetireReport
	var err error
	for end := time.Now().Add(45 * time.Second); ; time.Sleep(250 * time.Millisecond) {
		rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		ret, err = recovery.Retire(rctx, op, lost, false)
		cancel()
		if err == nil || time.Now().After(end) || ctx.Err() != nil {
			break
		}
	}
	if err != nil {
		return outcome(err, "retire "+lost)
	}
	var out []string
	for _, r := range ret.VMs {
		path, ok := lh.bundles[r.ID]
		if !ok {
			out = append(out, fmt.Sprintf("%s: no bundle", s.vmName(r.ID)))
			continue
		}
		b, err := os.ReadFile(path)
		if err != nil {
			out = append(out, fmt.Sprintf("%s: %v", s.vmName(r.ID), err))
			continue
		}
		if err := s.restoreOne(ctx, r.ID, b, lost, lh.dest, lh.call); err != nil {
			out = append(out, fmt.Sprintf("%s -> %s: %s", s.vmName(r.ID), lh.dest, outcome(err, lh.dest)))
			continue
		}
		lh.restored = append(lh.restored, r.ID)
		out = append(out, fmt.Sprintf("%s restored on %s", s.vmName(r.ID), lh.dest))
	}
	out = append(out, s.replaceTPM(ctx, lost, lh.oldEK, lh.dest))
	if s.lost[lost] == nil {
		for _, id := range lh.restored {
			cctx, cancel := context.WithTimeout(ctx, 20*time.Second)
			gen, err := s.f.InProcHost(lost).Daemon().Node().CheckStart(cctx, id)
			cancel()
			if err == nil {
				s.violate(s.step, "restore-old-copy", fmt.Sprintf("%s: restored on %s, but %s (back on a new TPM) admits its old copy at generation %d", s.vmName(id), lh.dest, lost, gen))
			}
		}
	}
	return strings.Join(out, "; ")
}

// restoreOne restores vm from bundle onto dest (3 tries while the
// registry has no quorum) and starts it there. The move is known once
// the restore returned; a failed one may still have moved the record.
func (s *Schedule) restoreOne(ctx context.Context, vm string, bundle []byte, from, dest string, call int64) error {
	r := &recovery.Restorer{Admin: s.f.InProcHost(dest).Admin(), Registry: s.f.Operator()}
	var err error
	for range 3 {
		rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		_, err = r.Restore(rctx, recovery.Request{Bundle: bundle, Identities: s.custodians.ids, VM: vm, Dest: dest})
		cancel()
		if err == nil || !errors.Is(err, registry.ErrNoQuorum) {
			break
		}
	}
	if err != nil {
		s.lin.add(regInput{VM: vm, From: from}, regOutput{}, call, call)
		return err
	}
	s.lin.add(regInput{VM: vm, From: from, To: dest}, regOutput{Known: true}, call, s.lin.now())
	s.hist.Faults["restored"]++
	hyp := s.f.InProcHost(dest).Fake()
	d, err := hyp.Domain(ctx, vm)
	if err != nil {
		return err
	}
	if d.State == hypervisor.StateAbsent {
		name := s.vmName(vm)
		if err := hyp.DefineVTPMDomain(ctx, hypervisor.Domain{UUID: vm, Name: name}, s.f.InProcHost(dest).Daemon().Host().Layout().VMState(vm)); err != nil {
			return fmt.Errorf("restored, define: %w", err)
		}
	}
	if d.State != hypervisor.StateRunning {
		if err := hyp.StartDomain(ctx, vm); err != nil {
			return fmt.Errorf("restored, start: %w", err)
		}
	}
	return nil
}

// replaceTPM brings a host that lost its TPM back on a new one, as the
// operator does: a new TPM, vtpmd init and start (it registers its new
// identity), then vtpmctl host reenroll through another host.
func (s *Schedule) replaceTPM(ctx context.Context, host, oldEK, via string) string {
	h := s.f.InProcHost(host)
	if h.Daemon() == nil { // not replaced yet (an earlier try may have)
		if err := h.ReplaceTPM(ctx); err != nil {
			return outcome(err, "replace "+host+"'s TPM")
		}
	}
	for end := time.Now().Add(30 * time.Second); time.Now().Before(end) && ctx.Err() == nil; time.Sleep(200 * time.Millisecond) {
		hv, err := s.f.Operator().Hosts(ctx, host)
		if err == nil && hv.Hosts[host].Host != nil && hv.Hosts[host].Host.Identity.EK != oldEK {
			break
		}
	}
	if _, err := operator.Reenroll(ctx, s.f.Operator(), s.f.InProcHost(via).Admin(), host, operator.EnrollOptions{Wait: 30 * time.Second}); err != nil {
		return outcome(err, "re-enrol "+host)
	}
	s.down[host] = false
	delete(s.lost, host)
	return host + " back on a new TPM, re-enrolled"
}

func (s *Schedule) vmName(id string) string {
	for _, v := range s.vms {
		if v.UUID == id {
			return v.Name
		}
	}
	return id
}
