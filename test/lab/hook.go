package lab

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"strings"
	"time"
)

// HookPath is where FleetConfig.HookMode installs vtpmm's qemu hook
// ('vtpmctl hook install'), as the host's libvirtd sees it.
const HookPath = "/etc/libvirt/hooks/qemu.d/vtpmm"

// SetHook turns the host's installed qemu hook on (mode 0755) or off
// (0644). libvirt decides at daemon start whether the qemu driver has
// hooks, but at every hook call it runs only the executable files of
// qemu.d; so a hook installed before libvirtd started (HookMode) can be
// switched per migration, and while it is off libvirt runs nothing (it
// only formats the domain XML it would have passed). The benchmark uses
// this to run hook mode and the methods without the hook on the same
// hosts.
func (h *Host) SetHook(on bool) error {
	mode := os.FileMode(0o644)
	if on {
		mode = 0o755
	}
	if err := os.Chmod(h.Path(HookPath), mode); err != nil {
		return fmt.Errorf("lab: switch the qemu hook of %s (installed with FleetConfig.HookMode?): %w", h.Name, err)
	}
	return nil
}

// HookRun is one run of vtpmm's qemu hook, as the host's libvirtd logged
// it (its debug log of util.command, which the lab turns on).
type HookRun struct {
	Domain string        `json:"domain"`
	Event  string        `json:"event"` // "OPERATION SUB-OPERATION", e.g. "migrate begin"
	Start  time.Time     `json:"start"`
	Took   time.Duration `json:"took"`
}

// HookRuns returns the runs of the hook at HookPath that libvirtd logged
// from byte offset from of its log on; next is where the next call
// starts (the end of the last complete line).
func (h *Host) HookRuns(from int64) (runs []HookRun, next int64, err error) {
	f, err := os.Open(h.Path("/var/log/libvirt/libvirtd.log"))
	if err != nil {
		return nil, from, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.NewSectionReader(f, from, 1<<40))
	if err != nil {
		return nil, from, err
	}
	if i := bytes.LastIndexByte(b, '\n'); i >= 0 {
		b = b[:i+1]
	} else {
		b = nil
	}
	runs = ParseHookRuns(string(b))
	return runs, from + int64(len(b)), nil
}

// ParseHookRuns pairs libvirt's "About to run ... HookPath DOMAIN OP SUBOP
// EXTRA" debug lines with the "Result" line of the same thread.
func ParseHookRuns(log string) []HookRun {
	var runs []HookRun
	open := map[string]int{} // thread -> index in runs
	for _, l := range strings.Split(log, "\n") {
		// "2026-12-06 20:38:39.059+0000: 27081: debug : virCommandRunAsync:2607 : About to run ..."
		fs := strings.SplitN(l, ": ", 4)
		if len(fs) < 4 || !strings.HasPrefix(fs[2], "debug") {
			continue
		}
		ts, err := time.Parse("2006-01-02 15:04:05.000-0700", fs[0])
		if err != nil {
			continue
		}
		thread, msg := fs[1], fs[3]
		if strings.HasPrefix(msg, "virCommandRunAsync:") {
			_, args, ok := strings.Cut(msg, HookPath+" ")
			if !ok {
				continue
			}
			a := strings.Fields(args)
			if len(a) < 3 {
				continue
			}
			open[thread] = len(runs)
			runs = append(runs, HookRun{Domain: a[0], Event: a[1] + " " + a[2], Start: ts, Took: -1})
		} else if i, ok := open[thread]; ok && strings.HasPrefix(msg, "virCommandRun:") {
			runs[i].Took = ts.Sub(runs[i].Start)
			delete(open, thread)
		}
	}
	return runs
}
