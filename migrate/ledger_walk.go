package migrate

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"hash/fnv"
)

// An independent, bounds-checked reader of bbolt's file format (v2), used
// by CheckLedger before bbolt maps the file: bbolt trusts every page id,
// offset and length it reads, so a damaged file makes it touch memory past
// the end of the file (SIGBUS: "fatal error: fault", which recover cannot
// catch) or panic on its own assertions ("cannot free page"). Everything
// bbolt will dereference is checked here first, on a copy of the file in
// memory, with Go's bounds checks as a second net.

const (
	boltMagic        = 0xED0CDAED
	boltVersion      = 2
	boltPageHeader   = 16
	boltElementSize  = 16
	boltMetaSize     = 64
	boltMetaSumLen   = 56 // the checksum covers the meta up to its checksum field
	boltBranchPage   = 0x01
	boltLeafPage     = 0x02
	boltMetaPage     = 0x04
	boltFreelistPage = 0x10
	boltBucketLeaf   = 0x01
	boltNoFreelist   = ^uint64(0)
	boltMaxDepth     = 64
)

var le = binary.LittleEndian

// boltMeta is one decoded meta page.
type boltMeta struct {
	magic, version, pageSize, flags uint32
	root, sequence                  uint64
	freelist, hwm, txid, checksum   uint64
}

func decodeMeta(b []byte) (boltMeta, bool) {
	if len(b) < boltPageHeader+boltMetaSize {
		return boltMeta{}, false
	}
	m := b[boltPageHeader : boltPageHeader+boltMetaSize]
	mt := boltMeta{
		magic: le.Uint32(m[0:]), version: le.Uint32(m[4:]), pageSize: le.Uint32(m[8:]), flags: le.Uint32(m[12:]),
		root: le.Uint64(m[16:]), sequence: le.Uint64(m[24:]), freelist: le.Uint64(m[32:]),
		hwm: le.Uint64(m[40:]), txid: le.Uint64(m[48:]), checksum: le.Uint64(m[56:]),
	}
	h := fnv.New64a()
	h.Write(m[:boltMetaSumLen])
	ok := mt.magic == boltMagic && mt.version == boltVersion && mt.checksum == h.Sum64()
	return mt, ok
}

func (m boltMeta) problem() string {
	switch {
	case m.magic != boltMagic:
		return fmt.Sprintf("magic %#08x is not bbolt's (%#08x)", m.magic, uint32(boltMagic))
	case m.version != boltVersion:
		return fmt.Sprintf("format version %d, bbolt writes %d", m.version, boltVersion)
	}
	return "checksum mismatch"
}

// boltWalk walks the tree of one meta page.
type boltWalk struct {
	data      []byte
	ps        uint64 // page size
	hwm       uint64
	reachable map[uint64]bool
	free      map[uint64]bool
	// buckets["tx"] etc.: the top-level buckets' key/value pairs.
	top map[string]map[string][]byte
	// payload ranges (file offsets) of every key and value, for tests.
	payload [][2]int
}

// walkErr is a defect found by the walk.
type walkErr struct{ msg string }

func (e *walkErr) Error() string { return e.msg }

func bad(format string, a ...any) error { return &walkErr{msg: fmt.Sprintf(format, a...)} }

// page returns the bytes of page id and its overflow pages after checking
// its header: id in range, the header naming the same id, one valid type.
func (w *boltWalk) page(id uint64, what string) ([]byte, uint16, uint16, error) {
	if id < 2 || id >= w.hwm {
		return nil, 0, 0, bad("%s page %d is outside the file's pages 2..%d", what, id, w.hwm-1)
	}
	off := id * w.ps
	hdr := w.data[off : off+boltPageHeader]
	if got := le.Uint64(hdr[0:]); got != id {
		return nil, 0, 0, bad("page %d (%s) says it is page %d", id, what, got)
	}
	flags, count, overflow := le.Uint16(hdr[8:]), le.Uint16(hdr[10:]), uint64(le.Uint32(hdr[12:]))
	if id+overflow >= w.hwm || id+overflow < id {
		return nil, 0, 0, bad("page %d (%s) claims %d overflow pages, past the file's pages", id, what, overflow)
	}
	for i := id; i <= id+overflow; i++ {
		if w.reachable[i] {
			return nil, 0, 0, bad("page %d is referenced twice (%s)", i, what)
		}
		if w.free[i] {
			return nil, 0, 0, bad("page %d is in use (%s) and on the freelist", i, what)
		}
		w.reachable[i] = true
	}
	return w.data[off : off+(1+overflow)*w.ps], flags, count, nil
}

func (w *boltWalk) readFreelist(id uint64) error {
	if id < 2 || id >= w.hwm {
		return bad("freelist page %d is outside the file's pages 2..%d", id, w.hwm-1)
	}
	p, flags, count, err := w.page(id, "freelist")
	if err != nil {
		return err
	}
	if flags != boltFreelistPage {
		return bad("freelist page %d has type %#x", id, flags)
	}
	start, n := uint64(boltPageHeader), uint64(count)
	if count == 0xFFFF {
		if len(p) < boltPageHeader+8 {
			return bad("freelist page %d is too short", id)
		}
		n, start = le.Uint64(p[boltPageHeader:]), boltPageHeader+8
	}
	if n > (uint64(len(p))-start)/8 {
		return bad("freelist page %d lists %d pages, more than it can hold", id, n)
	}
	for i := uint64(0); i < n; i++ {
		f := le.Uint64(p[start+8*i:])
		switch {
		case f < 2 || f >= w.hwm:
			return bad("freelist names page %d, outside the file's pages 2..%d", f, w.hwm-1)
		case w.free[f]:
			return bad("freelist names page %d twice", f)
		case w.reachable[f]:
			return bad("freelist names page %d, which is in use", f)
		}
		w.free[f] = true
	}
	return nil
}

// kv is one leaf entry.
type kv struct {
	key, value []byte
	bucket     bool
}

// walkTree returns the entries of the bucket rooted at page id, in order.
func (w *boltWalk) walkTree(id uint64, depth int, lower []byte) ([]kv, error) {
	if depth > boltMaxDepth {
		return nil, bad("tree deeper than %d pages at page %d", boltMaxDepth, id)
	}
	p, flags, count, err := w.page(id, "tree")
	if err != nil {
		return nil, err
	}
	base := int(id * w.ps)
	switch flags {
	case boltBranchPage:
		var out []kv
		var prev []byte
		for i := 0; i < int(count); i++ {
			eo := boltPageHeader + i*boltElementSize
			if eo+boltElementSize > len(p) {
				return nil, bad("branch page %d: %d elements do not fit", id, count)
			}
			pos, ks, child := int(le.Uint32(p[eo:])), int(le.Uint32(p[eo+4:])), le.Uint64(p[eo+8:])
			key, err := slice(p, eo+pos, ks)
			if err != nil {
				return nil, bad("branch page %d element %d: key %v", id, i, err)
			}
			if prev != nil && bytes.Compare(prev, key) >= 0 {
				return nil, bad("branch page %d: keys out of order at element %d", id, i)
			}
			if i == 0 && lower != nil && bytes.Compare(key, lower) < 0 {
				return nil, bad("branch page %d: first key below its parent's", id)
			}
			prev = key
			sub, err := w.walkTree(child, depth+1, key)
			if err != nil {
				return nil, err
			}
			out = append(out, sub...)
		}
		return out, nil
	case boltLeafPage:
		return w.leafEntries(p, base, count, fmt.Sprintf("leaf page %d", id), lower)
	}
	return nil, bad("page %d is a %s page where a branch or leaf page belongs", id, pageType(flags))
}

func (w *boltWalk) leafEntries(p []byte, base int, count uint16, where string, lower []byte) ([]kv, error) {
	var out []kv
	var prev []byte
	for i := 0; i < int(count); i++ {
		eo := boltPageHeader + i*boltElementSize
		if eo+boltElementSize > len(p) {
			return nil, bad("%s: %d elements do not fit", where, count)
		}
		flags, pos := le.Uint32(p[eo:]), int(le.Uint32(p[eo+4:]))
		ks, vs := int(le.Uint32(p[eo+8:])), int(le.Uint32(p[eo+12:]))
		if flags&^boltBucketLeaf != 0 {
			return nil, bad("%s element %d: unknown flags %#x", where, i, flags)
		}
		key, err := slice(p, eo+pos, ks)
		if err != nil {
			return nil, bad("%s element %d: key %v", where, i, err)
		}
		val, err := slice(p, eo+pos+ks, vs)
		if err != nil {
			return nil, bad("%s element %d: value %v", where, i, err)
		}
		if prev != nil && bytes.Compare(prev, key) >= 0 {
			return nil, bad("%s: keys out of order at element %d", where, i)
		}
		if i == 0 && lower != nil && bytes.Compare(key, lower) < 0 {
			return nil, bad("%s: first key below its parent's", where)
		}
		prev = key
		if base >= 0 {
			w.payload = append(w.payload, [2]int{base + eo + pos, base + eo + pos + ks + vs})
		}
		out = append(out, kv{key: key, value: val, bucket: flags&boltBucketLeaf != 0})
	}
	return out, nil
}

// bucket returns the entries of a bucket given its value in the parent.
func (w *boltWalk) bucket(name string, v []byte, depth int) ([]kv, error) {
	if len(v) < 16 {
		return nil, bad("bucket %q: header of %d bytes", name, len(v))
	}
	root := le.Uint64(v)
	if root != 0 {
		return w.walkTree(root, depth+1, nil)
	}
	// Inline bucket: a leaf page inside the value.
	in := v[16:]
	if len(in) < boltPageHeader {
		return nil, bad("inline bucket %q: %d bytes", name, len(in))
	}
	if f := le.Uint16(in[8:]); f != boltLeafPage {
		return nil, bad("inline bucket %q is a %s page", name, pageType(f))
	}
	return w.leafEntries(in, -1, le.Uint16(in[10:]), fmt.Sprintf("inline bucket %q", name), nil)
}

// walkAll walks every bucket from the root and fills w.top with the
// top-level buckets' entries (nested buckets are walked, not kept).
func (w *boltWalk) walkAll(root uint64) error {
	entries, err := w.walkTree(root, 0, nil)
	if err != nil {
		return err
	}
	w.top = map[string]map[string][]byte{}
	for _, e := range entries {
		if !e.bucket {
			return bad("root holds a plain key %q (only buckets belong there)", e.key)
		}
		sub, err := w.bucket(string(e.key), e.value, 0)
		if err != nil {
			return err
		}
		m := map[string][]byte{}
		for _, s := range sub {
			if s.bucket {
				if _, err := w.nested(string(s.key), s.value, 1); err != nil {
					return err
				}
				continue
			}
			m[string(s.key)] = s.value
		}
		w.top[string(e.key)] = m
	}
	return nil
}

func (w *boltWalk) nested(name string, v []byte, depth int) ([]kv, error) {
	if depth > boltMaxDepth {
		return nil, bad("buckets nested deeper than %d", boltMaxDepth)
	}
	sub, err := w.bucket(name, v, depth)
	if err != nil {
		return nil, err
	}
	for _, s := range sub {
		if s.bucket {
			if _, err := w.nested(string(s.key), s.value, depth+1); err != nil {
				return nil, err
			}
		}
	}
	return sub, nil
}

func slice(p []byte, off, n int) ([]byte, error) {
	if off < 0 || n < 0 || off > len(p) || n > len(p)-off {
		return nil, fmt.Errorf("at offset %d, %d bytes, past the end of its page (%d bytes)", off, n, len(p))
	}
	return p[off : off+n], nil
}

func pageType(f uint16) string {
	switch f {
	case boltBranchPage:
		return "branch"
	case boltLeafPage:
		return "leaf"
	case boltMetaPage:
		return "meta"
	case boltFreelistPage:
		return "freelist"
	}
	return fmt.Sprintf("unknown (%#x)", f)
}
