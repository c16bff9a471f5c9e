package swtpm

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// The lock of a state directory: swtpm (0.7 here, with libvirt and on its
// own) holds a POSIX write lock on D/.lock while it runs on D. Checking it
// tells a running vTPM from a stopped one without asking the hypervisor,
// which matters on paths libvirt itself is waiting on (its hooks).

// StateInUse reports whether a running swtpm holds the state directory dir
// (the pid of the holder, as the kernel reports it, or 0 when it is in
// another PID namespace). A directory without a lock file is not in use.
func StateInUse(dir string) (pid int, inUse bool, err error) {
	f, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_RDONLY, 0)
	if errors.Is(err, os.ErrNotExist) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, fmt.Errorf("state lock of %s: %w", dir, err)
	}
	defer f.Close()
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: 0, Len: 0}
	if err := unix.FcntlFlock(f.Fd(), unix.F_GETLK, &lk); err != nil {
		return 0, false, fmt.Errorf("state lock of %s: %w", dir, err)
	}
	if lk.Type == unix.F_UNLCK {
		return 0, false, nil
	}
	return int(lk.Pid), true, nil
}
