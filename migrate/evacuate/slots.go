package evacuate

import (
	"context"
	"fmt"
	"sync"
)

// DefaultParallel is how many libvirt migrations run at once unless the
// operator says otherwise. libvirt has no limit of its own on outgoing
// migrations (qemu.conf has no max_outgoing_migrations; that is oVirt
// vdsm's setting), but libvirtd serves at most max_client_requests = 5
// concurrent calls per client connection, and each MigrateToURI3 holds one
// for the whole migration: 4 leaves one for the job-stats polls and domain
// look-ups that progress and recovery need on the same connection. See
// docs/evacuation.md.
const DefaultParallel = 4

// Slots bounds the hypervisor migrations running at once across every
// batch of an evacuation. After Stop, Acquire fails with ErrStopped.
type Slots struct {
	ch       chan struct{}
	stop     chan struct{}
	stopOnce sync.Once

	mu       sync.Mutex
	inFlight int
	peak     int
}

// NewSlots returns n slots (DefaultParallel when n <= 0).
func NewSlots(n int) *Slots {
	if n <= 0 {
		n = DefaultParallel
	}
	return &Slots{ch: make(chan struct{}, n), stop: make(chan struct{})}
}

// Size is the number of slots.
func (s *Slots) Size() int { return cap(s.ch) }

// Acquire waits for a free slot. It fails with ErrStopped once Stop was
// called, and with ctx's error when ctx ends. Call release exactly once.
func (s *Slots) Acquire(ctx context.Context) (release func(), err error) {
	select {
	case <-s.stop:
		return nil, fmt.Errorf("acquire migration slot: %w", ErrStopped)
	default:
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("acquire migration slot: %w: %w", ErrStopped, err)
	}
	select {
	case s.ch <- struct{}{}:
	case <-s.stop:
		return nil, fmt.Errorf("acquire migration slot: %w", ErrStopped)
	case <-ctx.Done():
		return nil, fmt.Errorf("acquire migration slot: %w", ctx.Err())
	}
	s.mu.Lock()
	s.inFlight++
	s.peak = max(s.peak, s.inFlight)
	s.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			s.mu.Lock()
			s.inFlight--
			s.mu.Unlock()
			<-s.ch
		})
	}, nil
}

// Stop makes every later Acquire fail (and wakes those waiting).
func (s *Slots) Stop() { s.stopOnce.Do(func() { close(s.stop) }) }

// Stopped reports whether Stop was called.
func (s *Slots) Stopped() bool {
	select {
	case <-s.stop:
		return true
	default:
		return false
	}
}

// Peak is the most slots held at once so far.
func (s *Slots) Peak() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.peak
}
