package audit

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
)

// markedLog writes 12 records and returns the file, its bytes and the mark
// after the 12th record (what the anchor would carry).
func markedLog(t *testing.T) (string, []byte, Mark) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "audit.log")
	var recs []Record
	for i := 0; i < 12; i++ {
		recs = append(recs, sample[i%len(sample)])
	}
	l := writeLog(t, path, recs)
	seq, head := l.Head()
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return path, b, Mark{Seq: seq, Head: head}
}

func wantLogError(t *testing.T, name string, err, sentinel error, path string, line int) *LogError {
	t.Helper()
	var le *LogError
	if !errors.Is(err, sentinel) || !errors.As(err, &le) || le.Path != path || le.Problem == "" || le.Fix == "" {
		t.Fatalf("%s: Check = %v, want a *LogError (%v) naming %s", name, err, sentinel, path)
	}
	if line >= 0 && le.Line != line {
		t.Fatalf("%s: line %d, want %d (%v)", name, le.Line, line, err)
	}
	return le
}

func lineOf(b []byte, off int) int { return bytes.Count(b[:off], []byte("\n")) + 1 }

func TestCheckHonestAndHistory(t *testing.T) {
	t.Parallel()
	path, orig, mark := markedLog(t)
	sum, err := Check(path, CheckOptions{HadHistory: true, Mark: &mark})
	if err != nil || sum.Records != 12 {
		t.Fatalf("intact log: %+v, %v", sum, err)
	}
	// The log grew after the mark: still fine.
	l, err := Open(path, Options{Host: "host-a", Now: stepClock()})
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Append(t.Context(), sample[0]); err != nil {
		t.Fatal(err)
	}
	l.Close()
	if _, err := Check(path, CheckOptions{Mark: &mark}); err != nil {
		t.Fatalf("log grown past the mark: %v", err)
	}
	if err := os.WriteFile(path, orig, 0o600); err != nil {
		t.Fatal(err)
	}

	dir := t.TempDir()
	missing := filepath.Join(dir, "none.log")
	empty := filepath.Join(dir, "empty.log")
	if err := os.WriteFile(empty, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{missing, empty} {
		if _, err := Check(p, CheckOptions{}); err != nil {
			t.Fatalf("%s on a new host: %v", p, err)
		}
		_, err := Check(p, CheckOptions{HadHistory: true})
		wantLogError(t, p, err, ErrHistoryLost, p, 0)
		_, err = Check(p, CheckOptions{Mark: &mark})
		wantLogError(t, p, err, ErrHistoryLost, p, 0)
	}

	// Records cut from the end at a line boundary: the chain alone cannot
	// see it, the mark does.
	cut := bytes.LastIndexByte(orig[:len(orig)-1], '\n') + 1
	short := filepath.Join(dir, "short.log")
	if err := os.WriteFile(short, orig[:cut], 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Check(short, CheckOptions{}); err != nil {
		t.Fatalf("chain alone over a cut log: %v (it cannot see the cut)", err)
	}
	_, err = Check(short, CheckOptions{Mark: &mark})
	le := wantLogError(t, "cut log", err, ErrHistoryLost, short, 0)
	t.Logf("cut log: %v", le)

	// A wholesale rewrite with valid hashes: the mark's hash differs.
	other := filepath.Join(dir, "rewritten.log")
	var recs []Record
	for i := 0; i < 12; i++ {
		r := sample[i%len(sample)]
		r.Detail = "rewritten"
		recs = append(recs, r)
	}
	writeLog(t, other, recs).Close()
	_, err = Check(other, CheckOptions{Mark: &mark})
	wantLogError(t, "rewritten log", err, ErrTampered, other, 12)
}

func TestCheckDamagedLog(t *testing.T) {
	t.Parallel()
	_, orig, mark := markedLog(t)
	dir := t.TempDir()
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	// Truncated last line: ErrTruncated at line 12 (Open repairs it); with
	// the mark at 12, the repaired log would be short: history lost.
	p := write("partial.log", orig[:len(orig)-20])
	_, err := Check(p, CheckOptions{})
	wantLogError(t, "partial last line", err, ErrTruncated, p, 12)
	_, err = Check(p, CheckOptions{Mark: &mark})
	wantLogError(t, "partial last line below the mark", err, ErrHistoryLost, p, 0)

	// Bit flips anywhere: every one is refused, at the line it hit.
	rng := rand.New(rand.NewPCG(7, 7))
	for i := 0; i < 300; i++ {
		off, bit := rng.IntN(len(orig)), byte(1)<<rng.IntN(8)
		b := append([]byte(nil), orig...)
		b[off] ^= bit
		p := write(fmt.Sprintf("flip%d.log", i), b)
		_, err := Check(p, CheckOptions{Mark: &mark})
		var le *LogError
		if !errors.As(err, &le) || !(errors.Is(err, ErrTampered) || errors.Is(err, ErrTruncated) || errors.Is(err, ErrHistoryLost)) {
			t.Fatalf("flip %d (byte %d bit %#x): %v", i, off, bit, err)
		}
		if le.Line != 0 && le.Line != lineOf(orig, off) {
			t.Fatalf("flip %d in line %d reported at line %d: %v", i, lineOf(orig, off), le.Line, err)
		}
	}
}
