package lab

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"strings"
	"sync"
	"time"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/migrate/evacuate"
)

// EvacRun is one 'vtpmctl evacuate HOST --json' run: its output, exit
// code and wall time, its NDJSON events and the report (the last event;
// nil when the run ended without one).
type EvacRun struct {
	Result
	Wall   time.Duration
	Events []evacuate.Event
	Report *evacuate.Report
}

// Of returns the run's events of type typ.
func (r EvacRun) Of(typ evacuate.EventType) []evacuate.Event {
	var out []evacuate.Event
	for _, e := range r.Events {
		if e.Type == typ {
			out = append(out, e)
		}
	}
	return out
}

// EvacuateCmd returns an unstarted 'vtpmctl evacuate HOST --json ARGS'
// as the operator runs it on HOST: inside its namespaces (vtpmctl marks
// HOST draining in the registry with the operator's certificate, "root"
// in PKIDir), against HOST's vtpmd, which runs the evacuation. Its
// process group is its own (a kill reaches nsenter's child too).
func (f *Fleet) EvacuateCmd(ctx context.Context, h *FleetHost, args ...string) (*exec.Cmd, error) {
	full := append([]string{"evacuate", h.Name}, args...)
	full = append(full, "--socket", h.Vtpmd.Socket, "--pki", f.PKIDir)
	cmd, err := h.NsCommand(ctx, f.Tools.Vtpmctl, full...)
	if err != nil {
		return nil, err
	}
	cmd.WaitDelay = 5 * time.Second
	return cmd, nil
}

// Evacuate runs 'vtpmctl evacuate HOST --json ARGS' (EvacuateCmd) to
// the end and parses its events. err is set only when it could not run
// or its output is not NDJSON; the exit code is in the result.
func (f *Fleet) Evacuate(ctx context.Context, h *FleetHost, args ...string) (EvacRun, error) {
	cmd, err := f.EvacuateCmd(ctx, h, append([]string{"--json"}, args...)...)
	if err != nil {
		return EvacRun{}, err
	}
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	t0 := time.Now()
	err = cmd.Run()
	r := EvacRun{Wall: time.Since(t0), Result: Result{Stdout: out.String(), Stderr: errb.String()}}
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		r.Code = ee.ExitCode()
	case err != nil:
		r.Code = -1
		return r, err
	}
	r.Events, r.Report, err = ParseEvents(strings.NewReader(r.Stdout))
	return r, err
}

// ParseEvents reads 'vtpmctl evacuate --json' output: one event per line;
// the report is the report event's.
func ParseEvents(rd io.Reader) ([]evacuate.Event, *evacuate.Report, error) {
	var evs []evacuate.Event
	var rep *evacuate.Report
	sc := bufio.NewScanner(rd)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	for sc.Scan() {
		line := bytes.TrimSpace(sc.Bytes())
		if len(line) == 0 {
			continue
		}
		var e evacuate.Event
		if err := json.Unmarshal(line, &e); err != nil {
			return evs, rep, fmt.Errorf("lab: evacuation event %q: %w", Tail(string(line), 200), err)
		}
		evs = append(evs, e)
		if e.Type == evacuate.EventReport {
			rep = e.Report
		}
	}
	return evs, rep, sc.Err()
}

// HostInfo is the registry's view of host name ('vtpmctl host list
// --json' on h's vtpmd).
func (f *Fleet) HostInfo(ctx context.Context, h *FleetHost, name string) (adminapi.HostInfo, error) {
	r, err := h.Vtpmd.Ctl(ctx, "host", "list", "--json")
	if err != nil || r.Code != 0 {
		return adminapi.HostInfo{}, fmt.Errorf("%s: vtpmctl host list: %v %s", h.Name, err, r)
	}
	var hosts []adminapi.HostInfo
	if err := json.Unmarshal([]byte(r.Stdout), &hosts); err != nil {
		return adminapi.HostInfo{}, fmt.Errorf("%s: vtpmctl host list --json: %w", h.Name, err)
	}
	for _, hi := range hosts {
		if hi.Host == name {
			return hi, nil
		}
	}
	return adminapi.HostInfo{}, fmt.Errorf("%s: the registry has no host %s", h.Name, name)
}

// PlainMove is one VM moved by PlainMigrate: from Src to Dst.
type PlainMove struct {
	VM       *VM
	Src, Dst *FleetHost
}

// PlainResult is what PlainMigrate measured of one move: the virsh
// process' wall time and libvirt's completed job on the destination.
type PlainResult struct {
	Move PlainMove
	// At is when its virsh started, from the first start.
	At   time.Duration
	Wall time.Duration
	Job  JobResult
	Err  error
}

// JobResult is libvirt's completed migration job on a destination.
type JobResult struct {
	Elapsed, Downtime time.Duration
	Bytes             uint64
	Err               error
}

// CompletedJob reads the VM's last completed job on h (a migration's
// time, downtime and bytes on its destination).
func CompletedJob(ctx context.Context, h *FleetHost, vmUUID string) JobResult {
	js, err := h.Hyp.CompletedJobStats(ctx, vmUUID)
	if err != nil {
		return JobResult{Err: err}
	}
	return JobResult{Elapsed: js.Elapsed, Downtime: js.Downtime, Bytes: js.DataProcessed}
}

// PlainMigrate runs 'virsh migrate --live --p2p --persistent
// --undefinesource VM qemu+tcp://DST/system' for every move, at most
// parallel at once (in each source's namespaces, as an operator or a
// cloud controller without vtpmm would), and returns the wall time from
// the first start to the last end and each move's result. The VMs'
// secrets must already be defined on their destinations.
func PlainMigrate(ctx context.Context, moves []PlainMove, parallel int) (time.Duration, []PlainResult) {
	if parallel < 1 {
		parallel = 1
	}
	out := make([]PlainResult, len(moves))
	sem := make(chan struct{}, parallel)
	var wg sync.WaitGroup
	t0 := time.Now()
	for i, m := range moves {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			r := PlainResult{Move: m}
			s := time.Now()
			r.At = s.Sub(t0)
			o, _, err := m.Src.Virsh(ctx, "migrate", "--live", "--p2p", "--persistent", "--undefinesource", m.VM.Name, m.Dst.TCPURI)
			r.Wall = time.Since(s)
			if err != nil {
				r.Err = fmt.Errorf("virsh migrate %s %s->%s: %w: %s", m.VM.Name, m.Src.Name, m.Dst.Name, err, strings.TrimSpace(o))
			} else if d, derr := m.Dst.Hyp.Domain(ctx, m.VM.UUID); derr != nil || d.State != hypervisor.StateRunning {
				r.Err = fmt.Errorf("after virsh migrate %s: state %q on %s (%v)", m.VM.Name, d.State, m.Dst.Name, derr)
			}
			r.Job = CompletedJob(ctx, m.Dst, m.VM.UUID)
			out[i] = r
		}()
	}
	wg.Wait()
	return time.Since(t0), out
}
