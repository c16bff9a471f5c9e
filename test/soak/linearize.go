package soak

import (
	"context"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/anishathalye/porcupine"
)

// The registry's record of each VM as a register checked for
// linearizability with porcupine: the harness records every move it asks
// for (a migration, an evacuation's VM) and every read of the record (the
// operator's linearizable read at each check); the record may change
// only by those moves, one generation each, from the owner the move names.
//
// A move is known when its caller was told it committed (vtpmctl migrate
// reports the VM committed; an evacuation reports it moved): it then took
// effect between its call and its return. Every other move (failed,
// aborted, unresolved, a plain hypervisor migration whose key settles
// after it returns) is unknown: it may take effect at any time after its
// call, or never.

// regState is a VM's record: its owner and generation.
type regState struct {
	Owner string
	Gen   uint64
}

// regInput is an op on one VM's record: a read, or a move from From to To
// ("": any host but From).
type regInput struct {
	VM       string
	Read     bool
	From, To string
}

// regOutput is a read's record, or whether a move is known to have
// committed.
type regOutput struct {
	State regState
	Known bool
}

// linHistory records the ops; safe for concurrent use (a race).
type linHistory struct {
	start time.Time
	mu    sync.Mutex
	ops   []porcupine.Operation
	// dests are, per VM, the hosts a recorded move named as its
	// destination: each may own the VM from then on, read or not.
	dests map[string]map[string]bool
}

// movedTo returns the hosts a recorded move of vm named as destination.
func (l *linHistory) movedTo(vm string) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for h := range l.dests[vm] {
		out = append(out, h)
	}
	return out
}

const unknownReturn = math.MaxInt64

func (l *linHistory) now() int64 { return int64(time.Since(l.start)) }

func (l *linHistory) add(in regInput, out regOutput, call, ret int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !in.Read && !out.Known {
		ret = unknownReturn
	}
	if !in.Read && in.To != "" {
		if l.dests == nil {
			l.dests = map[string]map[string]bool{}
		}
		if l.dests[in.VM] == nil {
			l.dests[in.VM] = map[string]bool{}
		}
		l.dests[in.VM][in.To] = true
	}
	l.ops = append(l.ops, porcupine.Operation{ClientId: len(l.ops), Input: in, Output: out, Call: call, Return: ret})
}

// regModel is the register's sequential specification, over the hosts.
func regModel(hosts []string, first string) porcupine.Model {
	m := &porcupine.NondeterministicModel{
		Partition: func(h []porcupine.Operation) [][]porcupine.Operation {
			by := map[string][]porcupine.Operation{}
			var order []string
			for _, op := range h {
				vm := op.Input.(regInput).VM
				if _, ok := by[vm]; !ok {
					order = append(order, vm)
				}
				by[vm] = append(by[vm], op)
			}
			out := make([][]porcupine.Operation, 0, len(order))
			for _, vm := range order {
				out = append(out, by[vm])
			}
			return out
		},
		Init: func() []any { return []any{regState{Owner: first, Gen: 1}} },
		Step: func(state, input, output any) []any {
			st, in, out := state.(regState), input.(regInput), output.(regOutput)
			if in.Read {
				if out.State == st {
					return []any{st}
				}
				return nil
			}
			var next []any
			if !out.Known {
				next = append(next, st) // it never took effect (or not yet)
			}
			if st.Owner != in.From {
				return next
			}
			for _, h := range hosts {
				if h != in.From && (in.To == "" || in.To == h) {
					next = append(next, regState{Owner: h, Gen: st.Gen + 1})
				}
			}
			return next
		},
		DescribeOperation: func(input, output any) string {
			in, out := input.(regInput), output.(regOutput)
			if in.Read {
				return fmt.Sprintf("read -> %s@%d", out.State.Owner, out.State.Gen)
			}
			return fmt.Sprintf("move %s -> %s (known %v)", in.From, in.To, out.Known)
		},
		DescribeState: func(state any) string {
			st := state.(regState)
			return fmt.Sprintf("%s@%d", st.Owner, st.Gen)
		},
	}
	return m.ToModel()
}

// readRegistry records a read of every VM's record through the
// operator's client (a linearizable etcd read); a failed read records
// nothing.
func (s *Schedule) readRegistry(ctx context.Context) {
	ids := make([]string, len(s.vms))
	for i, vm := range s.vms {
		ids[i] = vm.UUID
	}
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	call := s.lin.now()
	view, err := s.f.Operator().VMs(ctx, ids...)
	ret := s.lin.now()
	if err != nil || view.Stale {
		return
	}
	for _, id := range ids {
		if r, ok := view.VMs[id]; ok {
			s.lin.add(regInput{VM: id, Read: true}, regOutput{State: regState{Owner: r.Owner, Gen: r.Generation}}, call, ret)
			s.mu.Lock()
			s.regOwner[id] = r.Owner
			s.mu.Unlock()
		}
	}
}

// checkLinearizable checks the recorded history; an illegal one is a
// violation, and its visualization is written next to the test's
// temporary files.
func (s *Schedule) checkLinearizable(step int) {
	model := regModel(Hosts, Hosts[0])
	s.lin.mu.Lock()
	ops := append([]porcupine.Operation(nil), s.lin.ops...)
	s.lin.mu.Unlock()
	var last int64
	for _, op := range ops {
		if op.Return != unknownReturn {
			last = max(last, op.Return)
		}
	}
	for i := range ops {
		if ops[i].Return == unknownReturn {
			ops[i].Return = last + 1 // after everything observed
		}
	}
	res, info := porcupine.CheckOperationsVerbose(model, ops, time.Minute)
	s.hist.Linearizable = string(res)
	switch res {
	case porcupine.Illegal:
		path := filepath.Join(os.TempDir(), fmt.Sprintf("soak-seed-%d.html", s.cfg.Seed))
		if err := porcupine.VisualizePath(model, info, path); err != nil {
			path = "not written: " + err.Error()
		}
		s.violate(step, "not-linearizable", fmt.Sprintf("the registry's records cannot be explained by the moves asked for (%d ops; porcupine's view: %s)", len(ops), path))
	case porcupine.Unknown:
		s.hist.add(step, "lin", "porcupine", fmt.Sprintf("timed out on %d ops", len(ops)))
	default:
		s.hist.add(step, "lin", "porcupine", fmt.Sprintf("linearizable (%d ops)", len(ops)))
	}
}
