package migrate

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/vtpmm/vtpmm/internal/atomicfile"
	"github.com/vtpmm/vtpmm/internal/ids"
	"github.com/vtpmm/vtpmm/internal/strictjson"
)

// ReplicaStore keeps a standby's replicas: one file per VM below Dir
// (DIR/VM.replica, mode 0600, written atomically), holding the replica as
// it came (the VM key wrapped for this host's migration key, the vTPM
// state encrypted under the VM key): no plaintext key ever touches disk.
type ReplicaStore struct{ Dir string }

// StoredReplica is one replica on disk.
type StoredReplica struct {
	V        int            `json:"v"`
	Request  ReplicaRequest `json:"replica"`
	Received time.Time      `json:"received"`
}

// replicaFormat is the version of the stored replica's format.
const replicaFormat = 1

// ErrNoReplica means this host holds no replica of the VM.
var ErrNoReplica = errors.New("no standby replica of the VM here")

func (s *ReplicaStore) path(vm string) (string, error) {
	if !ids.IsUUID(vm) {
		return "", fmt.Errorf("replica: %w: VM id %q", ErrBadMessage, vm)
	}
	return filepath.Join(s.Dir, vm+".replica"), nil
}

// Put stores (replaces) a replica and returns the bytes written.
func (s *ReplicaStore) Put(r *StoredReplica) (int, error) {
	p, err := s.path(r.Request.VM)
	if err != nil {
		return 0, err
	}
	r.V = replicaFormat
	b, err := json.Marshal(r)
	if err != nil {
		return 0, err
	}
	if err := os.MkdirAll(s.Dir, 0o700); err != nil {
		return 0, err
	}
	return len(b), atomicfile.WriteFile(p, b, 0o600)
}

// Get reads a replica (ErrNoReplica when there is none).
func (s *ReplicaStore) Get(vm string) (*StoredReplica, error) {
	p, err := s.path(vm)
	if err != nil {
		return nil, err
	}
	b, err := os.ReadFile(p)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("replica of %s: %w", vm, ErrNoReplica)
	}
	if err != nil {
		return nil, err
	}
	var r StoredReplica
	if err := strictjson.Decode(b, &r, maxReplicaMessage+4096); err != nil {
		return nil, fmt.Errorf("replica of %s: %w: %v", vm, ErrBadMessage, err)
	}
	if r.V != replicaFormat || r.Request.VM != vm {
		return nil, fmt.Errorf("replica of %s: %w: format %d, VM %s", vm, ErrBadMessage, r.V, r.Request.VM)
	}
	if err := r.Request.validate(); err != nil {
		return nil, fmt.Errorf("replica of %s: %w", vm, err)
	}
	return &r, nil
}

// Drop removes a replica (none: no error).
func (s *ReplicaStore) Drop(vm string) error {
	p, err := s.path(vm)
	if err != nil {
		return err
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// List reads every replica (unreadable ones are skipped).
func (s *ReplicaStore) List() ([]*StoredReplica, error) {
	ents, err := os.ReadDir(s.Dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []*StoredReplica
	for _, e := range ents {
		vm, ok := strings.CutSuffix(e.Name(), ".replica")
		if !ok {
			continue
		}
		if r, err := s.Get(vm); err == nil {
			out = append(out, r)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Request.VM < out[j].Request.VM })
	return out, nil
}
