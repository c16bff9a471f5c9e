package registry

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"sort"
	"sync"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/internal/atomicfile"
)

// cache is this host's last view of the VM records: every record it read
// or wrote, with the revision it saw it at. Without quorum, Cached serves
// it, so a host can still start a VM it owns by its last view (and by its
// TPM anchor). With a file, the view survives a restart; the file is
// rewritten in the background after changes (atomically, 0600) and at
// Close, so after a crash it may lag by the last writes: it is a hint that
// only ever lets a host start a VM its own anchor also says it owns.
type cache struct {
	mu   sync.Mutex
	rev  int64
	vms  map[string]cachedVM
	file string
	log  logrus.FieldLogger

	dirty  chan struct{} // nil without a file
	done   chan struct{}
	closed bool
	// moved is closed (and replaced) whenever rev advances: WaitRev.
	moved chan struct{}
}

type cachedVM struct {
	vm  VM
	rev int64
}

// cacheFile is the file format.
type cacheFile struct {
	V   int              `json:"v"`
	Rev int64            `json:"rev"`
	VMs []cacheFileEntry `json:"vms"`
}

type cacheFileEntry struct {
	Rev int64           `json:"rev"`
	VM  json.RawMessage `json:"vm"`
}

// maxCacheBytes bounds the cache file (about 100 000 VMs).
const maxCacheBytes = 32 << 20

func openCache(file string, log logrus.FieldLogger) (*cache, error) {
	c := &cache{vms: map[string]cachedVM{}, file: file, log: log, moved: make(chan struct{})}
	if file == "" {
		return c, nil
	}
	b, err := os.ReadFile(file)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return nil, fmt.Errorf("registry cache %s: %w", file, err)
	default:
		if err := c.load(b); err != nil {
			return nil, fmt.Errorf("registry cache %s: %w (the file holds this host's last view of the registry; remove it to start without one)", file, err)
		}
	}
	c.dirty = make(chan struct{}, 1)
	c.done = make(chan struct{})
	go c.writer()
	return c, nil
}

// DecodeCache decodes a cache file strictly (used at start; fuzzed).
func DecodeCache(b []byte) (int64, []VM, []int64, error) {
	if len(b) > maxCacheBytes {
		return 0, nil, nil, fmt.Errorf("%w: %d bytes, limit %d", ErrBadRecord, len(b), maxCacheBytes)
	}
	var f cacheFile
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&f); err != nil {
		return 0, nil, nil, fmt.Errorf("%w: %v", ErrBadRecord, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return 0, nil, nil, fmt.Errorf("%w: trailing data", ErrBadRecord)
	}
	if err := checkVersion(f.V); err != nil {
		return 0, nil, nil, err
	}
	if f.Rev < 0 {
		return 0, nil, nil, fmt.Errorf("%w: revision %d", ErrBadRecord, f.Rev)
	}
	vms := make([]VM, 0, len(f.VMs))
	revs := make([]int64, 0, len(f.VMs))
	seen := map[string]bool{}
	for _, e := range f.VMs {
		vm, err := DecodeVM(e.VM)
		if err != nil {
			return 0, nil, nil, err
		}
		if e.Rev <= 0 || e.Rev > f.Rev {
			return 0, nil, nil, fmt.Errorf("%w: VM %s at revision %d of a view at %d", ErrBadRecord, vm.ID, e.Rev, f.Rev)
		}
		if seen[vm.ID] {
			return 0, nil, nil, fmt.Errorf("%w: VM %s twice", ErrBadRecord, vm.ID)
		}
		seen[vm.ID] = true
		vms = append(vms, vm)
		revs = append(revs, e.Rev)
	}
	return f.Rev, vms, revs, nil
}

func (c *cache) load(b []byte) error {
	rev, vms, revs, err := DecodeCache(b)
	if err != nil {
		return err
	}
	c.rev = rev
	for i, vm := range vms {
		c.vms[vm.ID] = cachedVM{vm: vm, rev: revs[i]}
	}
	return nil
}

// put records what was read or written at rev: present records, and IDs
// known to be absent at rev. all replaces the whole view (a full listing).
func (c *cache) put(rev int64, vms []VM, absent []string, all bool) {
	c.mu.Lock()
	if all {
		old := c.vms
		c.vms = map[string]cachedVM{}
		for id, e := range old {
			if e.rev > rev { // newer than this listing (seen by the watch)
				c.vms[id] = e
			}
		}
	}
	for _, vm := range vms {
		if old, ok := c.vms[vm.ID]; !ok || old.rev <= rev {
			c.vms[vm.ID] = cachedVM{vm: vm, rev: rev}
		}
	}
	for _, id := range absent {
		if old, ok := c.vms[id]; ok && old.rev <= rev {
			delete(c.vms, id)
		}
	}
	c.setRev(rev)
	if c.dirty != nil && !c.closed {
		select {
		case c.dirty <- struct{}{}:
		default:
		}
	}
	c.mu.Unlock()
}

// advance records that the view is complete up to rev.
func (c *cache) advance(rev int64) {
	c.mu.Lock()
	c.setRev(rev)
	c.mu.Unlock()
}

// setRev raises the view's revision and wakes WaitRev. Called with mu held.
func (c *cache) setRev(rev int64) {
	if rev <= c.rev {
		return
	}
	c.rev = rev
	close(c.moved)
	c.moved = make(chan struct{})
}

// waitRev waits until the view's revision is at least rev.
func (c *cache) waitRev(ctx context.Context, rev int64) error {
	for {
		c.mu.Lock()
		if c.rev >= rev {
			c.mu.Unlock()
			return nil
		}
		ch := c.moved
		c.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

func (c *cache) view(ids []string) View {
	c.mu.Lock()
	defer c.mu.Unlock()
	v := View{Rev: c.rev, VMs: map[string]VM{}, Stale: true}
	if len(ids) == 0 {
		for id, e := range c.vms {
			v.VMs[id] = e.vm
		}
		return v
	}
	for _, id := range ids {
		if e, ok := c.vms[id]; ok {
			v.VMs[id] = e.vm
		}
	}
	return v
}

func (c *cache) marshal() ([]byte, error) {
	c.mu.Lock()
	f := cacheFile{V: Version, Rev: c.rev, VMs: make([]cacheFileEntry, 0, len(c.vms))}
	ids := make([]string, 0, len(c.vms))
	for id := range c.vms {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		e := c.vms[id]
		b, err := json.Marshal(&e.vm)
		if err != nil {
			c.mu.Unlock()
			return nil, err
		}
		f.VMs = append(f.VMs, cacheFileEntry{Rev: e.rev, VM: b})
	}
	c.mu.Unlock()
	return json.Marshal(&f)
}

func (c *cache) writer() {
	defer close(c.done)
	for range c.dirty {
		if err := c.write(); err != nil {
			c.log.WithError(err).WithField("file", c.file).Error("writing the registry cache failed")
		}
	}
}

func (c *cache) write() error {
	b, err := c.marshal()
	if err != nil {
		return err
	}
	return atomicfile.WriteFile(c.file, b, 0o600)
}

// close stops the writer and writes the file a last time.
func (c *cache) close() error {
	if c.dirty == nil {
		return nil
	}
	c.mu.Lock()
	c.closed = true
	close(c.dirty)
	c.mu.Unlock()
	<-c.done
	if err := c.write(); err != nil {
		return fmt.Errorf("registry cache %s: %w", c.file, err)
	}
	return nil
}
