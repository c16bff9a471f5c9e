package audit

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/internal/atomicfile"
)

// Options configures Open.
type Options struct {
	Host string             // this host's name, written into every record (required)
	Now  func() time.Time   // clock; default time.Now
	Log  logrus.FieldLogger // default: a logger that discards
}

// Log appends records to one audit file. It is safe for concurrent use.
type Log struct {
	path string
	host string
	now  func() time.Time
	log  logrus.FieldLogger

	sem    chan struct{} // a mutex that waiting callers can abandon on ctx
	f      *os.File
	seq    uint64
	head   string
	closed bool
	failed error
}

// Open opens or creates the audit log at path (mode 0600, append only),
// takes an exclusive lock on it, verifies the whole existing chain and
// continues it. A partial last line (crash during an append) is truncated
// away with a warning; any other defect makes Open fail with an error
// wrapping a *ChainError and ErrTampered.
func Open(path string, opts Options) (*Log, error) {
	op := "open audit log " + path
	if opts.Host == "" {
		return nil, fmt.Errorf("%s: empty host: %w", op, ErrInvalidOptions)
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Log == nil {
		l := logrus.New()
		l.SetOutput(io.Discard)
		opts.Log = l
	}
	_, statErr := os.Lstat(path)
	created := errors.Is(statErr, fs.ErrNotExist)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	ok := false
	defer func() {
		if !ok {
			f.Close()
		}
	}()
	if err := lockFile(f); err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", op, err)
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%s: not a regular file: %w", op, ErrInvalidOptions)
	}
	if st.Mode().Perm()&0o077 != 0 {
		opts.Log.WithField("path", path).Warnf("audit log had mode %v; setting 0600", st.Mode().Perm())
		if err := f.Chmod(0o600); err != nil {
			return nil, fmt.Errorf("%s: %w", op, err)
		}
	}
	sum, end, err := readChain(io.NewSectionReader(f, 0, st.Size()), nil)
	var ce *ChainError
	switch {
	case err == nil:
	case errors.As(err, &ce) && errors.Is(err, ErrTruncated):
		opts.Log.WithFields(logrus.Fields{"path": path, "line": ce.Line, "dropped_bytes": st.Size() - end}).
			Warn("audit log: removing the incomplete last line left by a crash during an append")
		if err := f.Truncate(end); err != nil {
			return nil, fmt.Errorf("%s: repair: %w", op, err)
		}
		if err := f.Sync(); err != nil {
			return nil, fmt.Errorf("%s: repair: %w", op, err)
		}
	default:
		return nil, fmt.Errorf("%s: %w (move the file aside, keep it as evidence, and start a new log)", op, err)
	}
	if created {
		if err := atomicfile.SyncDir(filepath.Dir(path)); err != nil {
			return nil, fmt.Errorf("%s: %w", op, err)
		}
	}
	ok = true
	opts.Log.WithFields(logrus.Fields{"path": path, "records": sum.Records, "head": sum.Last}).Debug("audit log opened")
	return &Log{
		path: path, host: opts.Host, now: opts.Now, log: opts.Log,
		sem: make(chan struct{}, 1), f: f, seq: uint64(sum.Records), head: sum.Last,
	}, nil
}

// Append completes rec (Seq, Time from the clock in UTC, Host, Prev and
// Hash; values the caller set there are replaced), writes it as one line
// and fsyncs the file before returning. rec.Event is required.
//
// If the write or the fsync fails the Log stops accepting records (the
// error and later ones wrap ErrFailed): reopen it to verify and repair the
// tail before continuing the chain.
func (l *Log) Append(ctx context.Context, rec Record) error {
	op := "audit append " + string(rec.Event)
	if !validEvent(rec.Event) {
		return fmt.Errorf("%s: event %q: %w", op, rec.Event, ErrInvalidRecord)
	}
	select {
	case l.sem <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("%s: %w", op, ctx.Err())
	}
	defer func() { <-l.sem }()
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	if l.closed {
		return fmt.Errorf("%s: %w", op, ErrClosed)
	}
	if l.failed != nil {
		return fmt.Errorf("%s: %w: %w", op, ErrFailed, l.failed)
	}
	rec.Seq = l.seq + 1
	rec.Time = l.now().UTC()
	rec.Host = l.host
	rec.Prev = l.head
	line, _, err := encode(rec)
	if err != nil {
		return fmt.Errorf("%s: %w: %w", op, ErrInvalidRecord, err)
	}
	if len(line) > MaxLineSize {
		return fmt.Errorf("%s: record of %d bytes exceeds %d: %w", op, len(line), MaxLineSize, ErrInvalidRecord)
	}
	if _, err := l.f.Write(append(line, '\n')); err != nil {
		l.failed = err
		return fmt.Errorf("%s: %w: %w", op, ErrFailed, err)
	}
	if err := l.f.Sync(); err != nil {
		l.failed = err
		return fmt.Errorf("%s: %w: %w", op, ErrFailed, err)
	}
	l.seq = rec.Seq
	l.head = lineHash(line)
	l.log.WithFields(logrus.Fields{"seq": rec.Seq, "event": rec.Event, "vm": rec.VM, "peer": rec.Peer}).Debug("audit record appended")
	return nil
}

// Head returns the seq of the last record and the head hash (what the next
// record will carry as prev), for export to an external system.
func (l *Log) Head() (seq uint64, head string) {
	l.sem <- struct{}{}
	defer func() { <-l.sem }()
	return l.seq, l.head
}

// Close releases the lock and closes the file. Appends already returned
// are durable; later ones fail with ErrClosed.
func (l *Log) Close() error {
	l.sem <- struct{}{}
	defer func() { <-l.sem }()
	if l.closed {
		return nil
	}
	l.closed = true
	if err := l.f.Close(); err != nil {
		return fmt.Errorf("close audit log %s: %w", l.path, err)
	}
	return nil
}
