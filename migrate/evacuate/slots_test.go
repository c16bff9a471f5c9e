package evacuate_test

import (
	"context"
	"errors"
	"testing"

	"github.com/vtpmm/vtpmm/migrate/evacuate"
)

func TestSlots(t *testing.T) {
	s := evacuate.NewSlots(0)
	if s.Size() != evacuate.DefaultParallel {
		t.Fatalf("default size %d", s.Size())
	}
	ctx := context.Background()
	var rels []func()
	for range s.Size() {
		r, err := s.Acquire(ctx)
		if err != nil {
			t.Fatal(err)
		}
		rels = append(rels, r)
	}
	full, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := s.Acquire(full); !errors.Is(err, evacuate.ErrStopped) || !errors.Is(err, context.Canceled) {
		t.Fatalf("acquire with a done context: %v", err)
	}
	rels[0]()
	rels[0]() // twice is harmless
	if r, err := s.Acquire(ctx); err != nil {
		t.Fatal(err)
	} else {
		r()
	}
	s.Stop()
	if _, err := s.Acquire(ctx); !errors.Is(err, evacuate.ErrStopped) || !s.Stopped() {
		t.Fatalf("acquire after Stop: %v", err)
	}
	if s.Peak() != evacuate.DefaultParallel {
		t.Errorf("peak %d", s.Peak())
	}
}
