package lab_test

import (
	"context"
	"errors"
	"io"
	"strings"
	"testing"

	"github.com/vtpmm/vtpmm/test/lab"
)

// *testing.T is a lab.T.
var _ lab.T = (*testing.T)(nil)

func TestRunCleansUpLastFirst(t *testing.T) {
	var order []string
	var log strings.Builder
	err := lab.Run(context.Background(), &log, func(lt lab.T) {
		lt.Cleanup(func() { order = append(order, "first") })
		lt.Cleanup(func() {
			order = append(order, "second")
			lt.Cleanup(func() { order = append(order, "added by second") })
		})
		lt.Logf("hello %d", 1)
	})
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(order, ","); got != "second,added by second,first" {
		t.Errorf("cleanup order %s", got)
	}
	if log.String() != "hello 1\n" {
		t.Errorf("log %q", log.String())
	}
}

func TestRunFatalStopsBodyAndCleansUp(t *testing.T) {
	sentinel := errors.New("boom")
	cleaned, after, failedInCleanup := false, false, false
	err := lab.Run(context.Background(), io.Discard, func(lt lab.T) {
		lt.Cleanup(func() { cleaned, failedInCleanup = true, lt.Failed() })
		lt.Fatal(sentinel)
		after = true
	})
	if !errors.Is(err, sentinel) {
		t.Fatalf("Run = %v, want %v", err, sentinel)
	}
	if after || !cleaned || !failedInCleanup {
		t.Errorf("after Fatal ran: %v; cleaned: %v; Failed in cleanup: %v", after, cleaned, failedInCleanup)
	}
}

func TestRunFailuresInCleanupsAndPanics(t *testing.T) {
	ran := 0
	err := lab.Run(context.Background(), io.Discard, func(lt lab.T) {
		lt.Cleanup(func() { ran++ })
		lt.Cleanup(func() { ran++; lt.Fatalf("cleanup %d failed", 2) })
		lt.Cleanup(func() { ran++; lt.Errorf("cleanup %d complained", 3) })
		panic("body panicked")
	})
	if ran != 3 {
		t.Errorf("%d cleanups ran, want 3", ran)
	}
	for _, want := range []string{"panic: body panicked", "cleanup 3 complained", "cleanup 2 failed"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Run = %v, want it to contain %q", err, want)
		}
	}
}

func TestRunCancelled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cleaned := false
	err := lab.Run(ctx, io.Discard, func(lt lab.T) {
		lt.Cleanup(func() { cleaned = true })
		cancel()
		<-ctx.Done()
	})
	if !errors.Is(err, context.Canceled) || !cleaned {
		t.Errorf("Run = %v, cleaned %v; want context.Canceled and cleaned", err, cleaned)
	}
}
