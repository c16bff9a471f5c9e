package attest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// Enrolment methods recorded in Enrollment.Method.
const (
	MethodActivation    = "activation"
	MethodAKCertificate = "ak-certificate"
)

// Enrollment records that an AK was proven to live in the TPM of an EK: by
// credential activation, or by an AK certificate that chains to an AK root.
type Enrollment struct {
	Host       string    `json:"host"`
	EKDigest   HexBytes  `json:"ek_digest"` // SHA-256 of the EK TPMT_PUBLIC
	AKName     HexBytes  `json:"ak_name"`
	EnrolledAt time.Time `json:"enrolled_at"`
	// Method is MethodActivation or MethodAKCertificate; records written
	// before it existed have none and count as activations.
	Method string `json:"method,omitempty"`
	// AKCertDigest is SHA-256 of the AK certificate (DER) an
	// ak-certificate enrolment was made on.
	AKCertDigest HexBytes `json:"ak_cert_digest,omitempty"`
}

// method returns the enrolment method ("" counts as an activation).
func (e *Enrollment) method() string {
	if e.Method == "" {
		return MethodActivation
	}
	return e.Method
}

// Enrollments is what the verifier needs from an enrolment store.
type Enrollments interface {
	// Add records a successful activation.
	Add(ctx context.Context, e Enrollment) error
	// Activated reports whether akName was activated with the EK whose
	// TPMT_PUBLIC has SHA-256 ekDigest.
	Activated(ctx context.Context, ekDigest, akName []byte) (bool, error)
}

// EnrollmentFinder is an optional capability of an Enrollments store: it
// returns the record itself (nil, nil when absent), so that the verifier can
// apply the policy's enrollment mode to the method the host was enrolled
// by. The verifier treats a store without it as holding activations only.
type EnrollmentFinder interface {
	Find(ctx context.Context, ekDigest, akName []byte) (*Enrollment, error)
}

var (
	_ Enrollments      = (*MemoryEnrollments)(nil)
	_ EnrollmentFinder = (*MemoryEnrollments)(nil)
	_ Enrollments      = (*FileEnrollments)(nil)
	_ EnrollmentFinder = (*FileEnrollments)(nil)
)

// lookupEnrollment finds the record of (ekDigest, akName) in store.
func lookupEnrollment(ctx context.Context, store Enrollments, ekDigest, akName []byte) (*Enrollment, error) {
	if f, ok := store.(EnrollmentFinder); ok {
		return f.Find(ctx, ekDigest, akName)
	}
	ok, err := store.Activated(ctx, ekDigest, akName)
	if err != nil || !ok {
		return nil, err
	}
	return &Enrollment{EKDigest: ekDigest, AKName: akName, Method: MethodActivation}, nil
}

// MemoryEnrollments is an in-memory Enrollments, safe for concurrent use.
type MemoryEnrollments struct {
	mu   sync.Mutex
	list []Enrollment
}

// Find implements EnrollmentFinder.
func (m *MemoryEnrollments) Find(_ context.Context, ekDigest, akName []byte) (*Enrollment, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return findRecord(m.list, ekDigest, akName), nil
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
	return findRecord(list, ekDigest, akName) != nil
}

// findRecord returns a copy of the latest record of (ekDigest, akName).
func findRecord(list []Enrollment, ekDigest, akName []byte) *Enrollment {
	for i := len(list) - 1; i >= 0; i-- {
		if e := list[i]; bytes.Equal(e.EKDigest, ekDigest) && bytes.Equal(e.AKName, akName) {
			return &e
		}
	}
	return nil
}

// FileEnrollments keeps enrolments in a JSON file (an array of
// Enrollment). Writes are atomic (temporary file, fsync, rename) and the
// file is mode 0600. A missing file is an empty store. The file is read on
// every lookup (another process may write it); its parsed form is reused
// while its SHA-256 is unchanged.
type FileEnrollments struct {
	Path string
	mu   sync.Mutex

	parsedDigest [32]byte
	parsed       []Enrollment
	hasParsed    bool
}

func (f *FileEnrollments) load() ([]Enrollment, error) {
	data, err := os.ReadFile(f.Path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("enrollments: %w", err)
	}
	d := sha256.Sum256(data)
	if f.hasParsed && d == f.parsedDigest {
		return f.parsed, nil
	}
	var list []Enrollment
	if err := json.Unmarshal(data, &list); err != nil {
		return nil, fmt.Errorf("enrollments: %s: %w", f.Path, err)
	}
	f.parsed, f.parsedDigest, f.hasParsed = list, d, true
	return list, nil
}

// Find implements EnrollmentFinder.
func (f *FileEnrollments) Find(_ context.Context, ekDigest, akName []byte) (*Enrollment, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	list, err := f.load()
	if err != nil {
		return nil, err
	}
	return findRecord(list, ekDigest, akName), nil
}

// Add implements Enrollments.
func (f *FileEnrollments) Add(_ context.Context, e Enrollment) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	list, err := f.load()
	if err != nil {
		return err
	}
	data, err := json.MarshalIndent(append(append([]Enrollment(nil), list...), e), "", "  ")
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
