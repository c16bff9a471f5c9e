//go:build linux || darwin || freebsd || netbsd || openbsd || dragonfly

package audit

import (
	"errors"
	"fmt"
	"os"
	"syscall"
	"time"
)

// lockWait bounds how long lockFile retries a held lock. A process that
// forks (os/exec) shares every open file description with the child until
// the child execs, flocks included: a log closed by one goroutine can stay
// locked for that moment while another starts swtpm. A second writer still
// gets ErrLocked after lockWait.
const lockWait = time.Second

// lockFile takes an exclusive flock on f, retrying a held lock for up to
// lockWait; it is released when f is closed. It keeps two writers from
// forking the chain.
func lockFile(f *os.File) error {
	deadline := time.Now().Add(lockWait)
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			return fmt.Errorf("lock: %w", err)
		}
		if time.Now().After(deadline) {
			return ErrLocked
		}
		time.Sleep(20 * time.Millisecond)
	}
}
