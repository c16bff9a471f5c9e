//go:build linux

package audit

import (
	"errors"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// TestLockSurvivesAForkedChild: a child forked while the log was open
// holds its file description (and so its flock) until it execs. The next
// writer waits that moment out instead of failing with ErrLocked; a writer
// that stays is still refused.
func TestLockSurvivesAForkedChild(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l, err := Open(path, Options{Host: "host-a"})
	if err != nil {
		t.Fatal(err)
	}
	// What a forked, not yet exec'd child holds: another descriptor of the
	// same open file description.
	child, err := syscall.Dup(int(l.f.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	go func() {
		time.Sleep(100 * time.Millisecond) // the child execs
		syscall.Close(child)
	}()
	l2, err := Open(path, Options{Host: "host-a"})
	if err != nil {
		t.Fatalf("open after the child let go: %v", err)
	}
	defer l2.Close()
	// A writer that holds the log is refused, after the wait.
	if _, err := Open(path, Options{Host: "host-a"}); !errors.Is(err, ErrLocked) {
		t.Fatalf("second writer: %v, want ErrLocked", err)
	}
}
