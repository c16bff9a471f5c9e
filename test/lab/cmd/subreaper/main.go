// Command subreaper runs a command as a Linux child subreaper: every
// orphaned descendant (libvirtd -d, and the QEMU and swtpm processes it
// daemonizes) is re-parented to it and reaped at once. Without it their
// zombies wait for PID 1, which reaps slowly on the test machines, and
// libvirt waits about 2 s for every QEMU it stops.
//
// Before starting the command it can set the hostname and bind-mount
// directories; run it in fresh mount and UTS namespaces for that (e.g.
// under `unshare --mount --uts --propagation private`).
//
// On SIGTERM or SIGINT it terminates all its children (SIGKILL after
// -grace), and it exits when it has no children left.
//
//	subreaper [-pidfile F] [-hostname H] [-bind SRC:DST]... -- CMD [ARGS...]
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

type binds []string

func (b *binds) String() string     { return strings.Join(*b, ",") }
func (b *binds) Set(v string) error { *b = append(*b, v); return nil }

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "subreaper:", err)
		os.Exit(1)
	}
}

func run() error {
	pidfile := flag.String("pidfile", "", "write this process's pid here")
	hostname := flag.String("hostname", "", "set the (UTS namespace's) hostname")
	grace := flag.Duration("grace", 5*time.Second, "time between SIGTERM and SIGKILL on shutdown")
	var bs binds
	flag.Var(&bs, "bind", "SRC:DST bind mount (repeatable; DST is created)")
	flag.Parse()
	args := flag.Args()
	if len(args) == 0 {
		return errors.New("no command given")
	}
	if *hostname != "" {
		if err := unix.Sethostname([]byte(*hostname)); err != nil {
			return fmt.Errorf("sethostname: %w", err)
		}
	}
	for _, b := range bs {
		src, dst, ok := strings.Cut(b, ":")
		if !ok {
			return fmt.Errorf("bad -bind %q", b)
		}
		if err := os.MkdirAll(dst, 0o755); err != nil {
			return err
		}
		if err := unix.Mount(src, dst, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind %s on %s: %w", src, dst, err)
		}
	}
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("prctl(PR_SET_CHILD_SUBREAPER): %w", err)
	}
	if *pidfile != "" {
		if err := os.WriteFile(*pidfile, []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644); err != nil {
			return err
		}
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	path, err := lookPath(args[0])
	if err != nil {
		return err
	}
	if _, err := os.StartProcess(path, args, &os.ProcAttr{Files: []*os.File{os.Stdin, os.Stdout, os.Stderr}}); err != nil {
		return err
	}
	go func() {
		<-sigs
		terminate(*grace)
	}()
	for {
		var ws unix.WaitStatus
		_, err := unix.Wait4(-1, &ws, 0, nil)
		switch {
		case errors.Is(err, unix.ECHILD):
			return nil
		case err != nil && !errors.Is(err, unix.EINTR):
			return fmt.Errorf("wait4: %w", err)
		}
	}
}

func lookPath(name string) (string, error) {
	if strings.Contains(name, "/") {
		return name, nil
	}
	for _, dir := range filepath.SplitList(os.Getenv("PATH")) {
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s: not found in PATH", name)
}

// terminate signals all children until none is left: SIGTERM, then
// SIGKILL after grace. Orphans re-parented meanwhile are signalled too.
func terminate(grace time.Duration) {
	deadline := time.Now().Add(grace)
	for {
		kids := children()
		if len(kids) == 0 {
			return
		}
		sig := unix.SIGTERM
		if time.Now().After(deadline) {
			sig = unix.SIGKILL
		}
		for _, p := range kids {
			_ = unix.Kill(p, sig)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// children lists the pids whose parent is this process.
func children() []int {
	self := os.Getpid()
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...; comm may contain spaces and ')'.
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(s[i+1:])
		if len(f) >= 2 {
			if pp, _ := strconv.Atoi(f[1]); pp == self {
				out = append(out, pid)
			}
		}
	}
	return out
}
