package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/vtpmm/vtpmm/test/lab"
)

// run runs both parts inside lab.Run, which stops and removes whatever
// they started (hosts, namespaces, daemons) when they end, also after a
// failure or Ctrl-C. It then checks that nothing is left, prints the
// timings, and the DEMO OK line.
func (d *demo) run(ctx context.Context) error {
	fmt.Fprintf(d.out, "vtpmm demo (work dir %s; its demo.log has the details, kept if the demo fails)\n", d.work)
	err := lab.Run(ctx, d.log, func(t lab.T) {
		t.Cleanup(d.stopHosts)
		if err := d.bind(ctx); err != nil {
			t.Fatal(err)
		}
		d.live(ctx, t)
		d.say("Clean-up: stop every vtpmd, libvirtd (with its QEMU and swtpm) and host TPM; delete the namespaces")
	})
	// Whatever happened, nothing may be left running.
	cleanErr := d.checkClean()
	if err == nil && cleanErr == nil {
		d.detail("no namespace and no process of the demo is left (ip netns list, /proc)")
	}
	d.endStep()
	d.log.Close()
	left := "nothing is left running"
	if cleanErr != nil {
		left = cleanErr.Error()
	}
	if err != nil && ctx.Err() != nil {
		if cleanErr != nil {
			fmt.Fprintf(d.out, "\nDEMO INTERRUPTED after %s: %s\n", dur(time.Since(d.start)), left)
			return errors.Join(ctx.Err(), cleanErr)
		}
		d.removeDirs() // nothing to inspect
		fmt.Fprintf(d.out, "\nDEMO INTERRUPTED after %s: stopped and cleaned up\n", dur(time.Since(d.start)))
		return ctx.Err()
	}
	if err != nil || cleanErr != nil {
		err = errors.Join(err, cleanErr)
		kept := d.work
		if d.net != nil {
			kept += " and " + d.net.Dir
		}
		fmt.Fprintf(d.out, "\nDEMO FAILED after %s: %v\n(%s; kept %s for inspection; logs in %s)\n",
			dur(time.Since(d.start)), firstLine(err.Error()), left, kept, d.log.Name())
		return err
	}
	if !d.keep {
		d.removeDirs()
	}
	d.summary()
	fmt.Fprintf(d.out, "\nDEMO OK: vTPM keys stay bound to their host's TPM and boot state; a Linux guest's sealed secret survived a restart and a live migration on libvirt to an attested host, recorded in the fleet registry (etcd, embedded in the three vtpmds; each host enrolled once); the untrusted host was refused and got nothing; host-a was evacuated to attested hosts; when web-1's host lost power, its standby fenced it, promoted its replica and restarted the guest with the same secret, and the old host refused its copy; after a host lost its TPM, its guest came back from a 2-of-3 escrow bundle with the same secret (%s)\n",
		dur(time.Since(d.start)))
	return nil
}

// removeDirs removes the work directory and the lab's.
func (d *demo) removeDirs() {
	_ = os.RemoveAll(d.work)
	if d.net != nil {
		_ = os.RemoveAll(d.net.Dir)
	}
}

// checkClean checks that no namespace of the lab and no process started
// from its directories (vtpmd, swtpm host TPMs, subreaper) or the work
// directory is left. libvirtd, QEMU and libvirt's swtpm are the
// subreaper's children: it exits only once they are gone.
func (d *demo) checkClean() error {
	var left []string
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		return fmt.Errorf("ip netns list: %w", err)
	}
	dirs := []string{d.work}
	if d.net != nil {
		dirs = append(dirs, d.net.Dir)
		for _, l := range strings.Split(string(out), "\n") {
			if strings.HasPrefix(l, d.net.ID+"-") {
				left = append(left, "namespace "+strings.Fields(l)[0])
			}
		}
	}
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil || filepath.Base(filepath.Dir(p)) == fmt.Sprint(os.Getpid()) {
			continue
		}
		cmd := strings.ReplaceAll(string(b), "\x00", " ")
		for _, dir := range dirs {
			if strings.Contains(cmd, dir) {
				left = append(left, fmt.Sprintf("process %s: %s", filepath.Base(filepath.Dir(p)), cmd))
			}
		}
	}
	if len(left) > 0 {
		return fmt.Errorf("left after the clean-up: %s", strings.Join(left, "; "))
	}
	return nil
}

// summary prints every step's time.
func (d *demo) summary() {
	fmt.Fprintf(d.out, "\nTimings per step:\n")
	for _, s := range d.steps {
		title := s.title
		if len(title) > 90 {
			title = title[:87] + "..."
		}
		fmt.Fprintf(d.out, "  [%2d] %9s  %s\n", s.n, dur(s.took), title)
	}
}

// firstLine is the first line of s.
func firstLine(s string) string {
	l, _, _ := strings.Cut(strings.TrimSpace(s), "\n")
	return l
}
