package audit

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
	logtest "github.com/sirupsen/logrus/hooks/test"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

var t0 = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

// stepClock returns t0, t0+1.5s, t0+3s, ... (fractional seconds exercise
// RFC3339Nano).
func stepClock() func() time.Time {
	var mu sync.Mutex
	n := 0
	return func() time.Time {
		mu.Lock()
		defer mu.Unlock()
		n++
		return t0.Add(time.Duration(n-1) * 1500 * time.Millisecond)
	}
}

// sample are the records of the golden log.
var sample = []Record{
	{Event: EventKeyRelease, VM: "6f1c2b9e-2f0a-4d51-9a51-0c6a3f0d9e11", Peer: "host-b", Generation: 3, Detail: "batch of 1"},
	{Event: EventKeyReleaseRefused, VM: "0b7e5d2c-8f43-4a8e-b1f0-5d2f9a7c3e20", Peer: "host-c", Generation: 7, Rule: "pcr-7", Detail: "PCR 7 differs from policy"},
	{Event: EventMigrationCommit, VM: "6f1c2b9e-2f0a-4d51-9a51-0c6a3f0d9e11", Peer: "host-b", Generation: 4},
	{Event: EventMigrationAbort, VM: "9d3a7e61-1c2b-4f08-8e5d-7a6b5c4d3e2f", Peer: "host-b", Generation: 2, Detail: "libvirt: <migration failed> & retried"},
	{Event: EventBackup, VM: "9d3a7e61-1c2b-4f08-8e5d-7a6b5c4d3e2f", Generation: 2, Detail: "ünïcode détail"},
}

func writeLog(t *testing.T, path string, recs []Record) *Log {
	t.Helper()
	l, err := Open(path, Options{Host: "host-a", Now: stepClock()})
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range recs {
		if err := l.Append(context.Background(), r); err != nil {
			t.Fatal(err)
		}
	}
	return l
}

func golden(t *testing.T) []byte {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("testdata", "chain.log"))
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// TestGolden pins the record format: the same records and clock give the
// same bytes as testdata/chain.log (go test -update rewrites it).
func TestGolden(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l := writeLog(t, path, sample)
	_, head := l.Head()
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if *update {
		if err := os.WriteFile(filepath.Join("testdata", "chain.log"), got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want := golden(t)
	if !bytes.Equal(got, want) {
		t.Fatalf("log differs from testdata/chain.log (go test -update to accept):\n%s", got)
	}
	first := strings.SplitN(string(want), "\n", 2)[0]
	if !strings.HasPrefix(first, `{"seq":1,"time":"2026-03-01T12:00:00Z","host":"host-a","event":"key-release",`) ||
		!strings.Contains(first, `"prev":"`+Genesis+`","hash":"`) {
		t.Errorf("first record: %s", first)
	}
	sum, err := Verify(bytes.NewReader(want))
	if err != nil || sum.Records != len(sample) || sum.Last != head {
		t.Errorf("Verify: %+v, %v; head %s", sum, err, head)
	}
}

func TestAppendReadRoundTrip(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l := writeLog(t, path, sample[:3])
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(path); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("mode: %v %v", st.Mode(), err)
	}
	// Reopen and continue the chain.
	l, err := Open(path, Options{Host: "host-a", Now: func() time.Time { return t0.Add(time.Hour) }})
	if err != nil {
		t.Fatal(err)
	}
	// Values Append owns are replaced.
	r := sample[3]
	r.Seq, r.Prev, r.Hash, r.Host = 99, "x", "y", "spoofed"
	if err := l.Append(context.Background(), r); err != nil {
		t.Fatal(err)
	}
	seq, head := l.Head()
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var got []Record
	sum, err := Read(f, func(r Record) error { got = append(got, r); return nil })
	if err != nil {
		t.Fatal(err)
	}
	if sum.Records != 4 || seq != 4 || sum.Last != head || len(got) != 4 {
		t.Fatalf("summary %+v, seq %d head %s, %d records", sum, seq, head, len(got))
	}
	for i, g := range got {
		want := sample[i]
		if g.Seq != uint64(i+1) || g.Host != "host-a" || g.Event != want.Event || g.VM != want.VM ||
			g.Peer != want.Peer || g.Generation != want.Generation || g.Rule != want.Rule || g.Detail != want.Detail {
			t.Errorf("record %d: %+v, want %+v", i+1, g, want)
		}
	}
	if !got[3].Time.Equal(t0.Add(time.Hour)) || got[3].Time.Location() != time.UTC {
		t.Errorf("time %v", got[3].Time)
	}
	stop := errors.New("stop")
	if _, err := Read(bytes.NewReader(golden(t)), func(Record) error { return stop }); err != stop {
		t.Errorf("callback error: %v", err)
	}
}

func TestAppendErrors(t *testing.T) {
	l := writeLog(t, filepath.Join(t.TempDir(), "audit.log"), nil)
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	tests := []struct {
		name string
		ctx  context.Context
		rec  Record
		want error
	}{
		{"no event", context.Background(), Record{VM: "x"}, ErrInvalidRecord},
		{"event with spaces", context.Background(), Record{Event: "key release"}, ErrInvalidRecord},
		{"event uppercase", context.Background(), Record{Event: "Key-Release"}, ErrInvalidRecord},
		{"record too long", context.Background(), Record{Event: EventKeyRelease, Detail: strings.Repeat("x", MaxLineSize)}, ErrInvalidRecord},
		{"cancelled context", cancelled, Record{Event: EventKeyRelease}, context.Canceled},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := l.Append(tt.ctx, tt.rec); !errors.Is(err, tt.want) {
				t.Errorf("err %v, want %v", err, tt.want)
			}
		})
	}
	if seq, _ := l.Head(); seq != 0 {
		t.Errorf("refused records were counted: seq %d", seq)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if err := l.Append(context.Background(), Record{Event: EventKeyRelease}); !errors.Is(err, ErrClosed) {
		t.Errorf("after Close: %v", err)
	}
	if err := l.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func TestOpen(t *testing.T) {
	dir := t.TempDir()
	if _, err := Open(filepath.Join(dir, "a.log"), Options{}); !errors.Is(err, ErrInvalidOptions) {
		t.Errorf("no host: %v", err)
	}
	if _, err := Open(dir, Options{Host: "h"}); err == nil {
		t.Error("opened a directory")
	}
	if _, err := Open(filepath.Join(dir, "missing", "a.log"), Options{Host: "h"}); err == nil {
		t.Error("opened in a missing directory")
	}

	// A second writer on the same file is refused.
	path := filepath.Join(dir, "locked.log")
	l := writeLog(t, path, sample[:1])
	if _, err := Open(path, Options{Host: "host-a"}); !errors.Is(err, ErrLocked) {
		t.Errorf("second Open: %v, want ErrLocked", err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}

	// A world-readable file is tightened to 0600.
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	l, err := Open(path, Options{Host: "host-a"})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if st, _ := os.Stat(path); st.Mode().Perm() != 0o600 {
		t.Errorf("mode %v", st.Mode().Perm())
	}
}

func TestOpenRefusesTamperedLog(t *testing.T) {
	data := bytes.Replace(golden(t), []byte("host-c"), []byte("host-d"), 1)
	path := filepath.Join(t.TempDir(), "audit.log")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := Open(path, Options{Host: "host-a"})
	var ce *ChainError
	if !errors.Is(err, ErrTampered) || !errors.As(err, &ce) || ce.Seq != 2 || !strings.Contains(err.Error(), "record 2: hash mismatch") {
		t.Fatalf("Open: %v", err)
	}
	after, _ := os.ReadFile(path)
	if !bytes.Equal(after, data) {
		t.Error("Open modified a tampered log")
	}
}

func TestOpenRepairsTruncatedTail(t *testing.T) {
	good := golden(t)
	lines := bytes.SplitAfter(good, []byte("\n"))
	partial := lines[2][:len(lines[2])/2] // record 3 cut mid-write
	path := filepath.Join(t.TempDir(), "audit.log")
	if err := os.WriteFile(path, append(bytes.Join(lines[:2], nil), partial...), 0o600); err != nil {
		t.Fatal(err)
	}
	f, _ := os.Open(path)
	_, err := Verify(f)
	f.Close()
	if !errors.Is(err, ErrTruncated) || errors.Is(err, ErrTampered) || !strings.Contains(err.Error(), "line 3: incomplete last line") {
		t.Fatalf("Verify: %v, want ErrTruncated only", err)
	}

	logger, hook := logtest.NewNullLogger()
	l, err := Open(path, Options{Host: "host-a", Now: stepClock(), Log: logger})
	if err != nil {
		t.Fatal(err)
	}
	if e := hook.LastEntry(); e == nil || e.Level != logrus.WarnLevel || e.Data["dropped_bytes"] != int64(len(partial)) {
		t.Errorf("no warning about the repair: %+v", e)
	}
	if err := l.Append(context.Background(), sample[2]); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	data, _ := os.ReadFile(path)
	sum, err := Verify(bytes.NewReader(data))
	if err != nil || sum.Records != 3 {
		t.Fatalf("after repair: %+v %v", sum, err)
	}
	if !bytes.HasPrefix(data, bytes.Join(lines[:2], nil)) {
		t.Error("repair changed complete records")
	}
}

func TestConcurrentAppends(t *testing.T) {
	path := filepath.Join(t.TempDir(), "audit.log")
	l := writeLog(t, path, nil)
	const workers, each = 8, 25
	var wg sync.WaitGroup
	errs := make(chan error, workers*each)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				errs <- l.Append(context.Background(), Record{Event: EventKeyRelease, Detail: fmt.Sprintf("w%d-%d", w, i)})
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	seen := map[string]bool{}
	sum, err := Read(f, func(r Record) error { seen[r.Detail] = true; return nil })
	if err != nil || sum.Records != workers*each || len(seen) != workers*each {
		t.Fatalf("summary %+v, %d distinct, err %v", sum, len(seen), err)
	}
}
