package attest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// Enrollment records that an AK was activated against an EK.
type Enrollment struct {
	Host       string    `json:"host"`
	EKDigest   HexBytes  `json:"ek_digest"` // SHA-256 of the EK TPMT_PUBLIC
	AKName     HexBytes  `json:"ak_name"`
	EnrolledAt time.Time `json:"enrolled_at"`
}

// Enrollments is what the verifier needs from an enrolment store.
type Enrollments interface {
	// Add records a successful activation.
	Add(ctx context.Context, e Enrollment) error
	// Activated reports whether akName was activated with the EK whose
	// TPMT_PUBLIC has SHA-256 ekDigest.
	Activated(ctx context.Context, ekDigest, akName []byte) (bool, error)
}

// MemoryEnrollments is an in-memory Enrollments, safe for concurrent use.
type MemoryEnrollments struct {
	mu   sync.Mutex
	list []Enrollment
}

// Add implements Enrollments.
func (m *MemoryEnrollments) Add(_ context.Context, e Enrollment) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.list = append(m.list, e)
	return nil
}

// Activated implements Enrollments.
func (m *MemoryEnrollments) Activated(_ context.Context, ekDigest, akName []byte) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return find(m.list, ekDigest, akName), nil
}

func find(list []Enrollment, ekDigest, akName []byte) bool {
	for _, e := range list {
		if bytes.Equal(e.EKDigest, ekDigest) && bytes.Equal(e.AKName, akName) {
			return true
		}
	}
	return false
}

// FileEnrollments keeps enrolments in a JSON file (an array of
// Enrollment). Writes are atomic (temporary file, fsync, rename) and the
// file is mode 0600. A missing file is an empty store.
type FileEnrollments struct {
	Path string
	mu   sync.Mutex
}

func (f *FileEnrollments) load() ([]Enrollment, error) {
	data, err := os.ReadFile(f.Path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("enrollments: %w", err)
	}
	var list []Enrollment
	if err := json.Unmarshal(data, &list); err != nil {
		return nil, fmt.Errorf("enrollments: %s: %w", f.Path, err)
	}
	return list, nil
}

// Add implements Enrollments.
func (f *FileEnrollments) Add(_ context.Context, e Enrollment) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	list, err := f.load()
	if err != nil {
		return err
	}
	data, err := json.MarshalIndent(append(list, e), "", "  ")
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(f.Path), ".enrollments-*")
	if err != nil {
		return fmt.Errorf("enrollments: %w", err)
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return fmt.Errorf("enrollments: %w", err)
	}
	if _, err := tmp.Write(append(data, '\n')); err != nil {
		tmp.Close()
		return fmt.Errorf("enrollments: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("enrollments: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("enrollments: %w", err)
	}
	if err := os.Rename(tmp.Name(), f.Path); err != nil {
		return fmt.Errorf("enrollments: %w", err)
	}
	return nil
}

// Activated implements Enrollments.
func (f *FileEnrollments) Activated(_ context.Context, ekDigest, akName []byte) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	list, err := f.load()
	if err != nil {
		return false, err
	}
	return find(list, ekDigest, akName), nil
}
