package evacuate

import (
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vbauerster/cupwriter"
	"github.com/vbauerster/mpb/v8"
	"github.com/vbauerster/mpb/v8/decor"
)

// RenderOptions choose how vtpmctl evacuate shows progress on stdout.
type RenderOptions struct {
	// JSON writes NDJSON events (--json).
	JSON bool
	// Terminal updates one line per VM in place (stdout is a terminal:
	// the caller detects it, e.g. with IsTerminal). Otherwise plain lines.
	Terminal bool
	// Width and Height of the terminal when w is not an *os.File (tests);
	// for a file the terminal is asked.
	Width, Height int

	refresh <-chan any // tests: render on demand
}

// Renderer is a Sink that writes progress; Close flushes it after the
// report event.
type Renderer interface {
	Sink
	Close() error
}

// IsTerminal reports whether f is a terminal.
func IsTerminal(f *os.File) bool { return cupwriter.New(f, false).IsTerminal() }

// NewRenderer returns the renderer o asks for, writing to w.
func NewRenderer(w io.Writer, o RenderOptions) Renderer {
	switch {
	case o.JSON:
		return jsonRenderer{NewJSONSink(w)}
	case o.Terminal:
		return newTermRenderer(w, o)
	}
	return &plainRenderer{w: w, last: map[string]Phase{}}
}

type jsonRenderer struct{ *JSONSink }

func (j jsonRenderer) Close() error { return j.Err() }

// plainRenderer writes one line per phase change of each VM, one per
// outcome, and the report: for logs and pipes.
type plainRenderer struct {
	w    io.Writer
	mu   sync.Mutex
	last map[string]Phase
	err  error
}

func (p *plainRenderer) printf(format string, a ...any) {
	if p.err == nil {
		_, p.err = fmt.Fprintf(p.w, format, a...)
	}
}

func (p *plainRenderer) Event(e Event) {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch e.Type {
	case EventPlan:
		var b strings.Builder
		writePlan(&b, e)
		p.printf("%s", b.String())
	case EventVMPhase:
		if p.last[e.VM] == e.Phase {
			return // bytes moved on: a terminal shows that, a log need not
		}
		p.last[e.VM] = e.Phase
		p.printf("%s\n", phaseLine(e.Name, e.VM, e.Dest, e.Phase, e.Bytes, e.Total, e.ElapsedMS, e.Detail))
	case EventVMDone:
		p.printf("%s\n", doneLine(e.Result))
	case EventHostRefused, EventHostFailed:
		p.printf("%s\n", hostLine(e))
	case EventReport:
		if p.err == nil {
			p.err = e.Report.WriteText(p.w)
		}
	}
}

func (p *plainRenderer) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.err
}

// writePlan lists every VM's destination and every host's part or why it
// was left out.
func writePlan(w io.Writer, e Event) {
	p := e.Plan
	what := "plan"
	if e.DryRun {
		what = "plan (dry run: nothing moves)"
	}
	if e.Resumed {
		what += ", continuing an earlier run"
	}
	fmt.Fprintf(w, "evacuate %s: %s: %d VMs to %d hosts, %d without a destination\n",
		p.Source, what, len(p.Assignments), len(p.Batches()), len(p.Unplaced))
	for _, a := range p.Assignments {
		fmt.Fprintf(w, "  vm   %-20s %s %9s -> %s\n", a.Name, a.VM, bytesIEC(a.Memory), a.Dest)
	}
	for _, u := range p.Unplaced {
		fmt.Fprintf(w, "  vm   %-20s %s %9s -> none: %s: %s\n", u.Name, u.VM, bytesIEC(u.Memory), u.Reason, u.Detail)
	}
	for _, h := range p.Hosts {
		if h.Eligible {
			fmt.Fprintf(w, "  host %-20s %d VMs, %s of %s room\n", h.Host, h.VMs, bytesIEC(h.Assigned), bytesIEC(h.Room))
			continue
		}
		fmt.Fprintf(w, "  host %-20s left out: %s\n", h.Host, exclusionText(ExcludedHost{Reason: h.Reason, Rule: h.Rule, Detail: h.Detail}))
	}
}

func label(name, vm string) string {
	if name == "" {
		return vm
	}
	return name
}

func phaseLine(name, vm, dest string, ph Phase, bytes, total uint64, ms int64, detail string) string {
	s := fmt.Sprintf("%-20s %-8s -> %-12s", label(name, vm), ph, dest)
	if total > 0 {
		s += fmt.Sprintf(" %s / %s", bytesIEC(bytes), bytesIEC(total))
	}
	s += fmt.Sprintf(" %.1fs", float64(ms)/1000)
	if detail != "" {
		s += " " + detail
	}
	return s
}

func doneLine(v *VMReport) string {
	s := fmt.Sprintf("%-20s %-8s", label(v.Name, v.VM), v.Outcome)
	if v.Host != "" {
		s += " runs on " + v.Host
	}
	if v.Generation > 0 {
		s += fmt.Sprintf(" at generation %d", v.Generation)
	}
	if v.Bytes > 0 || v.ElapsedMS > 0 {
		s += fmt.Sprintf(", %s in %.1fs", bytesIEC(v.Bytes), float64(v.ElapsedMS)/1000)
	}
	if d := v.detail(); d != "" {
		s += " (" + d + ")"
	}
	return s
}

func hostLine(e Event) string {
	verb := "failed"
	if e.Type == EventHostRefused {
		verb = "refused by attestation"
	}
	return fmt.Sprintf("host %s %s: %s; %d VMs re-planned", e.Host, verb, e.Detail, e.Replanned)
}

// termRenderer keeps a summary line and one line per VM updating in place
// from its migration to its commit (mpb bars), and prints each VM's final
// line above them when it is done.
type termRenderer struct {
	w       io.Writer
	p       *mpb.Progress
	mu      sync.Mutex
	lines   map[string]*vmLine
	summary *mpb.Bar
	// Counts are atomics: decorators run on mpb's goroutines and must
	// never wait for t.mu, which Event holds while it calls into mpb.
	planned atomic.Int64
	done    atomic.Int64
	moved   atomic.Int64
	report  *Report
	closed  bool
}

type vmLine struct {
	mu      sync.Mutex
	name    string
	dest    string
	phase   string
	bytes   uint64
	total   uint64
	elapsed time.Duration
	bar     *mpb.Bar
}

func newTermRenderer(w io.Writer, o RenderOptions) *termRenderer {
	var cw mpb.ConsoleWriter
	if f, ok := w.(*os.File); ok {
		cw = cupwriter.New(f, true)
	} else {
		cw = &fixedConsole{out: w, width: max(o.Width, 40), height: max(o.Height, 10)}
	}
	opts := []mpb.ContainerOption{mpb.WithConsoleWriter(cw), mpb.WithWidth(max(o.Width, 40))}
	if o.refresh != nil {
		opts = append(opts, mpb.WithManualRefresh(o.refresh))
	}
	return &termRenderer{w: w, p: mpb.New(opts...), lines: map[string]*vmLine{}}
}

func (t *termRenderer) Event(e Event) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return
	}
	switch e.Type {
	case EventPlan:
		var b strings.Builder
		writePlan(&b, e)
		_, _ = t.p.Write([]byte(b.String()))
		t.planned.Store(int64(len(e.Plan.Assignments)))
		if !e.DryRun && len(e.Plan.Assignments) > 0 {
			t.summary = t.p.New(int64(len(e.Plan.Assignments)), mpb.NopStyle(), mpb.BarPriority(-1),
				mpb.PrependDecorators(decor.Any(func(decor.Statistics) string { return t.summaryText() })))
		}
	case EventVMPhase:
		l := t.line(e)
		l.mu.Lock()
		l.phase, l.bytes, l.elapsed = string(e.Phase), e.Bytes, time.Duration(e.ElapsedMS)*time.Millisecond
		if e.Total > 0 {
			l.total = e.Total
		}
		bar, total := l.bar, max(l.total, 1)
		l.mu.Unlock()
		if bar == nil && (e.Phase == PhaseMigrate || e.Phase == PhaseCommit) {
			bar = t.p.New(int64(total), mpb.BarStyle(), mpb.BarWidth(24),
				mpb.PrependDecorators(decor.Any(func(decor.Statistics) string { return l.head() })),
				mpb.AppendDecorators(decor.Any(func(decor.Statistics) string { return l.tail() })))
			l.mu.Lock()
			l.bar = bar
			l.mu.Unlock()
		}
		if bar != nil {
			bar.SetCurrent(int64(min(e.Bytes, total)))
		}
	case EventVMDone:
		done := t.done.Add(1)
		if e.Result.Outcome == OutcomeMoved {
			t.moved.Add(1)
		}
		l := t.line(e)
		l.mu.Lock()
		l.phase = string(e.Result.Outcome)
		bar := l.bar
		l.mu.Unlock()
		if bar != nil {
			bar.Abort(true) // its live line goes away...
		}
		// ...and its final line is printed above the live ones for good
		// (mpb shows only as many live lines as the terminal has rows).
		_, _ = t.p.Write([]byte(doneLine(e.Result) + "\n"))
		if t.summary != nil {
			t.summary.SetCurrent(min(done, t.planned.Load()))
		}
	case EventHostRefused, EventHostFailed:
		_, _ = t.p.Write([]byte(hostLine(e) + "\n"))
	case EventReport:
		t.report = e.Report
	}
}

func (t *termRenderer) line(e Event) *vmLine {
	l, ok := t.lines[e.VM]
	if !ok {
		l = &vmLine{name: label(e.Name, e.VM), dest: e.Dest}
		t.lines[e.VM] = l
	}
	if e.Dest != "" {
		l.mu.Lock()
		l.dest = e.Dest
		l.mu.Unlock()
	}
	return l
}

func (t *termRenderer) summaryText() string {
	return fmt.Sprintf("evacuating: %d/%d done, %d moved", t.done.Load(), t.planned.Load(), t.moved.Load())
}

func (l *vmLine) head() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return fmt.Sprintf("%-20.20s %-8s -> %-12.12s", l.name, l.phase, l.dest)
}

func (l *vmLine) tail() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return fmt.Sprintf("%9s / %-9s %6.1fs", bytesIEC(l.bytes), bytesIEC(l.total), l.elapsed.Seconds())
}

// Close completes every line, stops the live area and writes the report.
func (t *termRenderer) Close() error {
	t.mu.Lock()
	t.closed = true
	for _, l := range t.lines {
		l.mu.Lock()
		bar := l.bar // never call into mpb holding l.mu: its decorators take it
		l.mu.Unlock()
		if bar != nil && !bar.Completed() {
			bar.Abort(false)
		}
	}
	if t.summary != nil {
		t.summary.SetTotal(-1, true)
	}
	t.mu.Unlock()
	t.p.Wait()
	if t.report == nil {
		return nil
	}
	return t.report.WriteText(t.w)
}

// fixedConsole is a terminal of a fixed size over any writer (tests, and
// terminals that are not an *os.File): like cupwriter, each flush moves
// the cursor up over the previous frame and clears below.
type fixedConsole struct {
	strings.Builder
	out           io.Writer
	width, height int
}

var _ mpb.ConsoleWriter = (*fixedConsole)(nil)

func (c *fixedConsole) ReadFrom(r io.Reader) (int64, error) {
	b, err := io.ReadAll(r)
	c.Builder.Write(b)
	return int64(len(b)), err
}

func (c *fixedConsole) IsTerminal() bool               { return true }
func (c *fixedConsole) GetTermSize() (int, int, error) { return c.width, c.height, nil }
func (c *fixedConsole) Flush(lines int) error {
	if _, err := io.WriteString(c.out, c.String()); err != nil {
		return err
	}
	c.Reset()
	if lines > 0 {
		_, err := fmt.Fprintf(c.out, "\x1b[%dA\x1b[J", lines)
		return err
	}
	return nil
}
