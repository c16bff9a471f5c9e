package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/vtpmm/vtpmm/internal/fixtures"
	"github.com/vtpmm/vtpmm/test/lab"
	"github.com/vtpmm/vtpmm/vtpm/emuhost"
)

type demo struct {
	bin, work       string
	goodLog, badLog string
	keep            bool
	out, errw       io.Writer
	start           time.Time
	hosts           []*emuhost.Host // part 1's host TPMs
	log             *os.File        // the lab's log (T.Logf, libvirt)
	net             *lab.Network    // part 2's lab network
	runDirs         []string        // part 1's vtpmd run directories

	step      int
	stepStart time.Time
	steps     []stepTime
}

// stepTime is a finished step and how long it took.
type stepTime struct {
	n     int
	title string
	took  time.Duration
}

func newDemo(args []string, stdout, stderr io.Writer) (*demo, error) {
	fs := flag.NewFlagSet("vtpmm-demo", flag.ContinueOnError)
	fs.SetOutput(stderr)
	d := &demo{out: stdout, errw: stderr, start: time.Now()}
	fs.StringVar(&d.bin, "bin", "bin", "directory holding vtpmd, vtpmctl and vtpmm-guest (and optionally subreaper)")
	fs.StringVar(&d.work, "work", "", "work directory (default: a new one under /tmp)")
	fs.StringVar(&d.goodLog, "boot-log", "", "TCG event log the hosts boot with (crypto-agile, SHA-256 bank; default: the embedded GCE COS 85 log)")
	fs.StringVar(&d.badLog, "tampered-log", "", "event log of a tampered boot (default: the embedded Ubuntu 21.04 log, Secure Boot off)")
	fs.BoolVar(&d.keep, "keep", false, "keep the work and lab directories")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	for _, b := range []string{"vtpmd", "vtpmctl", "vtpmm-guest"} {
		if _, err := os.Stat(filepath.Join(d.bin, b)); err != nil {
			return nil, fmt.Errorf("%s not found in %s (run 'make build'): %w", b, d.bin, err)
		}
	}
	if err := lab.Require(); err != nil {
		return nil, fmt.Errorf("%w ('make deps' installs what is missing; the demo runs as root)", err)
	}
	var err error
	if d.bin, err = filepath.Abs(d.bin); err != nil {
		return nil, err
	}
	if d.work == "" {
		if d.work, err = os.MkdirTemp("/tmp", "vtpmm-demo-"); err != nil {
			return nil, err
		}
	} else if err := os.MkdirAll(d.work, 0o700); err != nil {
		return nil, err
	}
	good, tampered, err := fixtures.BootLogs(filepath.Join(d.work, "fixtures"))
	if err != nil {
		return nil, err
	}
	for _, l := range []struct {
		p   *string
		def string
	}{{&d.goodLog, good}, {&d.badLog, tampered}} {
		if *l.p == "" {
			*l.p = l.def
		}
		if *l.p, err = filepath.Abs(*l.p); err != nil {
			return nil, err
		}
		if _, err := os.Stat(*l.p); err != nil {
			return nil, fmt.Errorf("boot log: %w", err)
		}
	}
	if d.log, err = os.OpenFile(filepath.Join(d.work, "demo.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600); err != nil {
		return nil, err
	}
	return d, nil
}

// stopHosts stops part 1's host TPMs and removes its run directories.
func (d *demo) stopHosts() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, h := range d.hosts {
		_ = h.Stop(ctx)
	}
	d.hosts = nil
	for _, dir := range d.runDirs {
		_ = os.RemoveAll(dir)
	}
	d.runDirs = nil
}

// say ends the current step (printing its time) and starts the next one.
func (d *demo) say(format string, a ...any) {
	d.endStep()
	d.step++
	d.stepStart = time.Now()
	title := fmt.Sprintf(format, a...)
	d.steps = append(d.steps, stepTime{n: d.step, title: title})
	fmt.Fprintf(d.out, "\n[%2d] %s\n", d.step, title)
}

// endStep prints the current step's time, once.
func (d *demo) endStep() {
	if d.stepStart.IsZero() {
		return
	}
	took := time.Since(d.stepStart)
	d.steps[len(d.steps)-1].took = took
	d.stepStart = time.Time{}
	fmt.Fprintf(d.out, "     -- step %d took %s\n", d.step, dur(took))
}

// part prints a part's heading.
func (d *demo) part(format string, a ...any) {
	d.endStep()
	fmt.Fprintf(d.out, "\n== %s ==\n", fmt.Sprintf(format, a...))
}

func (d *demo) detail(format string, a ...any) {
	fmt.Fprintf(d.out, "     %s\n", fmt.Sprintf(format, a...))
}

// host starts an emulated host TPM and boots it with an event log.
func (d *demo) host(ctx context.Context, name, bootLog string) (*emuhost.Host, error) {
	t0 := time.Now()
	h, err := emuhost.Start(ctx, emuhost.Config{Dir: filepath.Join(d.work, name, "hosttpm"), Name: name})
	if err != nil {
		return nil, err
	}
	d.hosts = append(d.hosts, h)
	if err := d.boot(ctx, h, bootLog); err != nil {
		return nil, err
	}
	d.detail("%s: swtpm host TPM with EK certificates from its own CA, booted from %s (%s)",
		name, filepath.Base(bootLog), ms(time.Since(t0)))
	return h, nil
}

func (d *demo) boot(ctx context.Context, h *emuhost.Host, log string) error {
	b, err := os.ReadFile(log)
	if err != nil {
		return err
	}
	return h.Boot(ctx, b)
}

// config writes a vtpmd configuration file, file.yaml, for host name.
func (d *demo) config(file, name, dataDir, tpmURI string) (string, error) {
	// Under /tmp, not the work directory: a short path for the sockets.
	runDir, err := os.MkdirTemp("/tmp", "vtpmm-run-")
	if err != nil {
		return "", err
	}
	d.runDirs = append(d.runDirs, runDir)
	p := filepath.Join(d.work, file+".yaml")
	cfg := fmt.Sprintf("host_id: %s\ndata_dir: %s\ntpm: %s\nrun_dir: %s\nvault:\n  pcrs: \"0,2,4,7\"\nlog_level: info\n",
		name, dataDir, tpmURI, runDir)
	return p, os.WriteFile(p, []byte(cfg), 0o600)
}

// vtpmd runs one vtpmd command; stdout is returned, logs go to a file.
func (d *demo) vtpmd(ctx context.Context, stdin string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, filepath.Join(d.bin, "vtpmd"), args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	cmd.Stdin = strings.NewReader(stdin)
	err := cmd.Run()
	d.appendLog(errb.Bytes())
	if err != nil {
		return out.String(), errors.New(lastLine(errb.String()))
	}
	return out.String(), nil
}

func (d *demo) appendLog(b []byte) {
	f, err := os.OpenFile(filepath.Join(d.work, "vtpmd.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err == nil {
		_, _ = f.Write(b)
		f.Close()
	}
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return lines[len(lines)-1]
}

// runningVtpmd is a running 'vtpmd run'.
type runningVtpmd struct {
	cmd  *exec.Cmd
	sock string
	logs bytes.Buffer
}

func (d *demo) startAgent(ctx context.Context, cfg string) (*runningVtpmd, error) {
	a := &runningVtpmd{cmd: exec.Command(filepath.Join(d.bin, "vtpmd"), "--config", cfg, "run")}
	a.cmd.Stderr = &a.logs
	stdout, err := a.cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := a.cmd.Start(); err != nil {
		return nil, err
	}
	lines := make(chan string)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	timeout := time.After(30 * time.Second)
	for {
		select {
		case l, ok := <-lines:
			if !ok {
				_ = a.cmd.Wait()
				d.appendLog(a.logs.Bytes())
				return nil, fmt.Errorf("vtpmd run exited: %s", lastLine(a.logs.String()))
			}
			if _, uri, ok := strings.Cut(l, " running at "); ok {
				a.sock = uri
				d.detail("vtpmd: %s", l)
			}
			if strings.HasPrefix(l, "ready:") {
				go func() {
					for range lines {
					}
				}()
				return a, nil
			}
		case <-timeout:
			_ = a.cmd.Process.Kill()
			return nil, fmt.Errorf("vtpmd run did not become ready in 30 s")
		case <-ctx.Done():
			_ = a.cmd.Process.Kill()
			return nil, ctx.Err()
		}
	}
}

func (d *demo) stopAgent(a *runningVtpmd) error {
	if err := a.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		return err
	}
	err := a.cmd.Wait()
	d.appendLog(a.logs.Bytes())
	return err
}

func (d *demo) guest(ctx context.Context, uri string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, filepath.Join(d.bin, "vtpmm-guest"), append([]string{"--tpm", uri}, args...)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("vtpmm-guest %s: %s", args[0], lastLine(errb.String()))
	}
	return out.String(), nil
}

func ms(d time.Duration) string { return fmt.Sprintf("%d ms", d.Milliseconds()) }

// dur is d in ms below a second, else in seconds.
func dur(d time.Duration) string {
	if d < time.Second {
		return ms(d)
	}
	return fmt.Sprintf("%.2f s", d.Seconds())
}

func indent(s string) string {
	return strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", "\n     ")
}

func randomSecret() string {
	b := make([]byte, 12)
	_, _ = rand.Read(b)
	return "tenant-disk-key-" + hex.EncodeToString(b)
}
