//go:build e2e

package e2e_test

import (
	"context"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/hypervisor/libvirt"
	"github.com/vtpmm/vtpmm/test/lab"
)

// eventWatch records the lifecycle events one WatchLifecycle delivers.
type eventWatch struct {
	host   *lab.Host
	cancel context.CancelFunc
	done   chan error
	mu     sync.Mutex
	seen   []seenEvent
	more   chan struct{}
	once   sync.Once
	err    error
}

type seenEvent struct {
	hypervisor.LifecycleEvent
	at time.Time
}

// watchEvents runs h.Hyp.WatchLifecycle until stop (or the test's end).
func watchEvents(ctx context.Context, t *testing.T, h *lab.Host) *eventWatch {
	t.Helper()
	wctx, cancel := context.WithCancel(ctx)
	w := &eventWatch{host: h, cancel: cancel, done: make(chan error, 1), more: make(chan struct{}, 1)}
	go func() {
		w.done <- h.Hyp.WatchLifecycle(wctx, func(e hypervisor.LifecycleEvent) {
			w.mu.Lock()
			w.seen = append(w.seen, seenEvent{e, time.Now()})
			w.mu.Unlock()
			select {
			case w.more <- struct{}{}:
			default:
			}
		})
	}()
	t.Cleanup(func() { w.stop(t) })
	return w
}

// wait returns the first event of vm with that event and detail,
// failing the test if none came within limit.
func (w *eventWatch) wait(t *testing.T, vm string, event hypervisor.EventType, detail hypervisor.EventDetail, limit time.Duration) seenEvent {
	t.Helper()
	deadline := time.After(limit)
	for {
		w.mu.Lock()
		for _, e := range w.seen {
			if e.VM == vm && e.Event == event && e.Detail == detail {
				w.mu.Unlock()
				return e
			}
		}
		w.mu.Unlock()
		select {
		case <-w.more:
		case <-deadline:
			t.Fatalf("%s: no %s/%s event for %s within %v; got %s", w.host.Name, event, detail, vm, limit, w.list(vm, time.Now()))
		}
	}
}

// list renders vm's events (all events for vm == "") with their times
// relative to t0.
func (w *eventWatch) list(vm string, t0 time.Time) string {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []string
	for _, e := range w.seen {
		if vm == "" || e.VM == vm {
			out = append(out, string(e.Event)+"/"+string(e.Detail)+" at "+e.at.Sub(t0).Round(time.Millisecond).String())
		}
	}
	return "[" + strings.Join(out, ", ") + "]"
}

// stop cancels the watch and waits for WatchLifecycle to return.
func (w *eventWatch) stop(t *testing.T) error {
	w.once.Do(func() {
		t0 := time.Now()
		w.cancel()
		select {
		case w.err = <-w.done:
			t.Logf("%s: WatchLifecycle returned %v %v after its context ended", w.host.Name, w.err, time.Since(t0).Round(time.Millisecond))
		case <-time.After(time.Minute):
			t.Errorf("%s: WatchLifecycle did not return a minute after its context ended", w.host.Name)
		}
	})
	return w.err
}

// probe defines and undefines throwaway domains on the host until the
// watch reports one: from then on the watch is registered.
func (w *eventWatch) probe(ctx context.Context, t *testing.T) {
	t.Helper()
	for i := 0; ; i++ {
		id := lab.NewUUID()
		if err := w.host.Hyp.DefineVM(ctx, libvirt.VMSpec{Name: "probe", UUID: id, TCG: true}); err != nil {
			t.Fatal(err)
		}
		if err := w.host.Hyp.UndefineDomain(ctx, id, true); err != nil {
			t.Fatal(err)
		}
		select {
		case <-w.more:
		case <-time.After(2 * time.Second):
		}
		w.mu.Lock()
		n := len(w.seen)
		w.mu.Unlock()
		if n > 0 {
			return
		}
		if i == 30 {
			t.Fatalf("%s: no lifecycle event for probe domains", w.host.Name)
		}
	}
}

// TestLibvirtLifecycleEvents: WatchLifecycle on two hosts sees a plain
// live migration A->B as stopped/migrated on A and resumed/migrated on B
// (the events vtpmd settles on), then B->A with a new watch on A after the
// first one returned. Cancelling returns nil and leaves no goroutine of the
// watcher behind.
func TestLibvirtLifecycleEvents(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	n := newNetwork(ctx, t)
	a := newHost(ctx, t, n, "host-a", "10.251.0.1")
	b := newHost(ctx, t, n, "host-b", "10.251.0.2")
	wa, wb := watchEvents(ctx, t, a), watchEvents(ctx, t, b)
	wa.probe(ctx, t)
	wb.probe(ctx, t)

	vm, pass := lab.NewUUID(), passphrase()
	startVM(ctx, t, a, vm, "eventvm", pass)
	wa.wait(t, vm, "started", "booted", time.Minute)
	if err := b.Hyp.DefineSecret(ctx, vm, pass); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	if err := a.Hyp.Migrate(ctx, vm, b.Target()); err != nil {
		t.Fatal(err)
	}
	t1 := time.Now()
	wa.wait(t, vm, "stopped", "migrated", time.Minute)
	wb.wait(t, vm, "started", "migrated", time.Minute)
	wb.wait(t, vm, "resumed", "migrated", time.Minute)
	t.Logf("A->B: migration took %v; times relative to its start:\n  A: %s\n  B: %s",
		t1.Sub(t0).Round(time.Millisecond), wa.list(vm, t0), wb.list(vm, t0))

	if err := wa.stop(t); err != nil {
		t.Fatalf("WatchLifecycle on A after cancel: %v, want nil", err)
	}
	wa2 := watchEvents(ctx, t, a)
	wa2.probe(ctx, t)
	if err := a.Hyp.DefineSecret(ctx, vm, pass); err != nil {
		t.Fatal(err)
	}
	t0 = time.Now()
	if err := b.Hyp.Migrate(ctx, vm, a.Target()); err != nil {
		t.Fatal(err)
	}
	t1 = time.Now()
	wb.wait(t, vm, "stopped", "migrated", time.Minute)
	wa2.wait(t, vm, "resumed", "migrated", time.Minute)
	t.Logf("B->A (second watch on A): migration took %v; times relative to its start:\n  B: %s\n  A: %s",
		t1.Sub(t0).Round(time.Millisecond), wb.list(vm, t0), wa2.list(vm, t0))

	for _, w := range []*eventWatch{wa2, wb} {
		if err := w.stop(t); err != nil {
			t.Fatalf("WatchLifecycle on %s after cancel: %v, want nil", w.host.Name, err)
		}
	}
	// Every goroutine WatchLifecycle started has ended (libvirt's event
	// loop, started once per process, stays).
	buf := make([]byte, 1<<20)
	stacks := string(buf[:runtime.Stack(buf, true)])
	for _, fn := range []string{"(*Hypervisor).WatchLifecycle", "(*Hypervisor).watchOnce", "(*eventQueue)"} {
		if strings.Contains(stacks, fn) {
			t.Errorf("a goroutine in %s is left after every watch returned:\n%s", fn, stacks)
		}
	}
}
