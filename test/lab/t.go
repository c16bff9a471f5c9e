package lab

import (
	"context"
	"errors"
	"fmt"
	"io"
	"runtime"
	"runtime/debug"
	"strings"
	"sync"
	"time"
)

// T is what the lab needs from its caller. *testing.T and *testing.B
// satisfy it; Run provides one for programs such as the demo.
//
// As in package testing, Fatal and Fatalf stop the calling goroutine
// (runtime.Goexit), so they must be called from the goroutine running the
// test or Run's body; Cleanup functions run last-in first-out when it
// ends, also after a failure.
type T interface {
	Helper()
	Logf(format string, args ...any)
	Errorf(format string, args ...any)
	Fatal(args ...any)
	Fatalf(format string, args ...any)
	Failed() bool
	Cleanup(func())
}

// CancelGrace is how long Run waits, after ctx is cancelled, for the body
// to return before it runs the cleanups anyway.
const CancelGrace = 30 * time.Second

// Run runs body with a T outside of go test, and then every function
// body registered with T.Cleanup (last first), also when body failed,
// panicked or ctx was cancelled (Ctrl-C): whatever the lab started is
// stopped and removed before Run returns. T.Logf writes lines to log.
//
// It returns nil if nothing failed, else the errors of Fatal, Errorf and
// panics, in order (errors.Join).
func Run(ctx context.Context, log io.Writer, body func(T)) error {
	r := &runner{log: log}
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer r.recover()
		body(r)
	}()
	select {
	case <-done:
	case <-ctx.Done():
		select {
		case <-done:
		case <-time.After(CancelGrace):
			r.Errorf("lab: body still running %v after %w; cleaning up anyway", CancelGrace, context.Cause(ctx))
		}
	}
	if ctx.Err() != nil && !r.Failed() {
		r.Errorf("lab: %w", context.Cause(ctx))
	}
	r.cleanup()
	r.mu.Lock()
	defer r.mu.Unlock()
	return errors.Join(r.errs...)
}

type runner struct {
	mu       sync.Mutex
	log      io.Writer
	errs     []error
	cleanups []func()
}

func (r *runner) Helper() {}

func (r *runner) Logf(format string, args ...any) {
	s := fmt.Sprintf(format, args...)
	if !strings.HasSuffix(s, "\n") {
		s += "\n"
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	_, _ = io.WriteString(r.log, s)
}

func (r *runner) fail(err error) {
	r.Logf("FAIL: %v", err)
	r.mu.Lock()
	defer r.mu.Unlock()
	r.errs = append(r.errs, err)
}

func (r *runner) Errorf(format string, args ...any) { r.fail(fmt.Errorf(format, args...)) }

func (r *runner) Fatal(args ...any) {
	if len(args) == 1 {
		if err, ok := args[0].(error); ok {
			r.fail(err)
			runtime.Goexit()
		}
	}
	r.fail(errors.New(fmt.Sprint(args...)))
	runtime.Goexit()
}

func (r *runner) Fatalf(format string, args ...any) {
	r.fail(fmt.Errorf(format, args...))
	runtime.Goexit()
}

func (r *runner) Failed() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.errs) > 0
}

func (r *runner) Cleanup(f func()) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.cleanups = append(r.cleanups, f)
}

func (r *runner) recover() {
	if p := recover(); p != nil {
		r.fail(fmt.Errorf("panic: %v\n%s", p, debug.Stack()))
	}
}

// cleanup runs the cleanups last first, each on its own goroutine so that
// a Fatal or a panic in one does not skip the others. A cleanup may
// register more cleanups; they run next.
func (r *runner) cleanup() {
	for {
		r.mu.Lock()
		n := len(r.cleanups)
		if n == 0 {
			r.mu.Unlock()
			return
		}
		f := r.cleanups[n-1]
		r.cleanups = r.cleanups[:n-1]
		r.mu.Unlock()
		done := make(chan struct{})
		go func() {
			defer close(done)
			defer r.recover()
			f()
		}()
		<-done
	}
}
