package libvirt

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"time"

	golibvirt "libvirt.org/go/libvirt"

	"github.com/vtpmm/vtpmm/hypervisor"
)

var _ hypervisor.LifecycleWatcher = (*Hypervisor)(nil)

// Keepalive of the event connection: a dead libvirtd is noticed after
// about interval × (count+1) seconds and the watcher reconnects.
const (
	keepAliveInterval = 5
	keepAliveCount    = 3
	minBackoff        = time.Second
	maxBackoff        = 30 * time.Second
)

// libvirt's event loop is the one piece of process-wide state here, and it
// is libvirt's own: virEventRegisterDefaultImpl installs one loop for the
// whole process (it cannot be unregistered or run twice), and something
// must keep calling virEventRunDefaultImpl for callbacks, keepalives and
// close notifications to happen. So it is started once, on first use, and
// runs for the rest of the process; each WatchLifecycle only adds its own
// connection and callbacks to it. Connections opened before it was
// registered keep working as before (without events).
var (
	eventLoopOnce sync.Once
	eventLoopErr  error
)

func startEventLoop() error {
	eventLoopOnce.Do(func() {
		if eventLoopErr = golibvirt.EventRegisterDefaultImpl(); eventLoopErr != nil {
			return
		}
		go func() {
			for {
				if err := golibvirt.EventRunDefaultImpl(); err != nil {
					time.Sleep(100 * time.Millisecond) // never spin
				}
			}
		}()
	})
	return eventLoopErr
}

// eventQueue hands events from libvirt's callback (which must not block:
// it runs on the event loop) to the consumer, in order, without dropping.
type eventQueue struct {
	mu    sync.Mutex
	items []hypervisor.LifecycleEvent
	wake  chan struct{} // capacity 1
}

func (q *eventQueue) push(e hypervisor.LifecycleEvent) {
	q.mu.Lock()
	q.items = append(q.items, e)
	q.mu.Unlock()
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

func (q *eventQueue) take() []hypervisor.LifecycleEvent {
	q.mu.Lock()
	defer q.mu.Unlock()
	out := q.items
	q.items = nil
	return out
}

// WatchLifecycle delivers the domain lifecycle events of this host to fn
// until ctx ends, then returns nil. It uses its own connection to the
// Hypervisor's URI, with keepalive, and reconnects with backoff when that
// connection fails or closes (events meanwhile are lost: callers must not
// depend on them alone). fn runs on one goroutine, one event at a time; it
// may call libvirt. It fails only if libvirt's event loop cannot be set up.
func (h *Hypervisor) WatchLifecycle(ctx context.Context, fn func(hypervisor.LifecycleEvent)) error {
	if err := startEventLoop(); err != nil {
		return fmt.Errorf("libvirt: event loop: %w", wrapLibvirt(err))
	}
	q := &eventQueue{wake: make(chan struct{}, 1)}
	done := make(chan struct{})
	delivered := make(chan struct{})
	go func() {
		defer close(delivered)
		for {
			select {
			case <-done:
				return
			case <-q.wake:
				for _, e := range q.take() {
					fn(e)
				}
			}
		}
	}()
	defer func() { close(done); <-delivered }()

	backoff := minBackoff
	for {
		connected, err := h.watchOnce(ctx, q)
		if ctx.Err() != nil {
			return nil
		}
		if connected {
			backoff = minBackoff
		}
		h.log.WithError(err).WithField("retry", backoff).Warn("lifecycle events: connection lost; reconnecting")
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, maxBackoff)
	}
}

// watchOnce opens one event connection and feeds q until ctx ends (nil) or
// the connection fails. connected reports whether the callback was set up.
func (h *Hypervisor) watchOnce(ctx context.Context, q *eventQueue) (connected bool, err error) {
	conn, err := connect(ctx, h.cfg.URI)
	if err != nil {
		return false, err
	}
	defer conn.Close()
	if err := conn.SetKeepAlive(keepAliveInterval, keepAliveCount); err != nil {
		return false, fmt.Errorf("libvirt: keepalive: %w", wrapLibvirt(err))
	}
	closed := make(chan golibvirt.ConnectCloseReason, 1)
	if err := conn.RegisterCloseCallback(func(_ *golibvirt.Connect, r golibvirt.ConnectCloseReason) {
		select {
		case closed <- r:
		default:
		}
	}); err != nil {
		return false, fmt.Errorf("libvirt: close callback: %w", wrapLibvirt(err))
	}
	defer func() { _ = conn.UnregisterCloseCallback() }()
	id, err := conn.DomainEventLifecycleRegister(nil, func(_ *golibvirt.Connect, d *golibvirt.Domain, e *golibvirt.DomainEventLifecycle) {
		// Runs on libvirt's event loop: only the domain object's local
		// accessors (no RPC), then hand the event over without blocking.
		uuid, _ := d.GetUUIDString()
		name, _ := d.GetName()
		ev, detail := eventNames(e)
		q.push(hypervisor.LifecycleEvent{VM: uuid, Name: name, Event: ev, Detail: detail})
	})
	if err != nil {
		return false, fmt.Errorf("libvirt: register lifecycle events: %w", wrapLibvirt(err))
	}
	h.log.WithField("uri", h.cfg.URI).Debug("lifecycle events: watching")
	select {
	case <-ctx.Done():
		_ = conn.DomainEventDeregister(id)
		return true, nil
	case r := <-closed:
		return true, fmt.Errorf("%w (reason %d)", ErrConnClosed, r)
	}
}

var eventTypes = map[golibvirt.DomainEventType]struct {
	name    hypervisor.EventType
	details []string // indexed by the detail number
}{
	golibvirt.DOMAIN_EVENT_DEFINED:     {hypervisor.EventDefined, []string{"added", "updated", "renamed", "snapshot"}},
	golibvirt.DOMAIN_EVENT_UNDEFINED:   {hypervisor.EventUndefined, []string{"removed", "renamed"}},
	golibvirt.DOMAIN_EVENT_STARTED:     {hypervisor.EventStarted, []string{"booted", "migrated", "restored", "snapshot", "wakeup", "recreated"}},
	golibvirt.DOMAIN_EVENT_SUSPENDED:   {hypervisor.EventSuspended, []string{"paused", "migrated", "ioerror", "watchdog", "restored", "snapshot", "api-error", "postcopy", "postcopy-failed", "guest-shutdown"}},
	golibvirt.DOMAIN_EVENT_RESUMED:     {hypervisor.EventResumed, []string{"unpaused", "migrated", "snapshot", "postcopy", "postcopy-failed"}},
	golibvirt.DOMAIN_EVENT_STOPPED:     {hypervisor.EventStopped, []string{"shutdown", "destroyed", "crashed", "migrated", "saved", "failed", "snapshot", "recreated"}},
	golibvirt.DOMAIN_EVENT_SHUTDOWN:    {hypervisor.EventShutdown, []string{"finished", "guest", "host"}},
	golibvirt.DOMAIN_EVENT_PMSUSPENDED: {hypervisor.EventPMSuspended, []string{"memory", "disk"}},
	golibvirt.DOMAIN_EVENT_CRASHED:     {hypervisor.EventCrashed, []string{"panicked", "crashloaded"}},
}

// eventNames names a lifecycle event and its detail as virsh event does.
func eventNames(e *golibvirt.DomainEventLifecycle) (hypervisor.EventType, hypervisor.EventDetail) {
	t, ok := eventTypes[e.Event]
	if !ok {
		return hypervisor.EventType(strconv.Itoa(int(e.Event))), hypervisor.EventDetail(strconv.Itoa(e.Detail))
	}
	if e.Detail >= 0 && e.Detail < len(t.details) {
		return t.name, hypervisor.EventDetail(t.details[e.Detail])
	}
	return t.name, hypervisor.EventDetail(strconv.Itoa(e.Detail))
}
