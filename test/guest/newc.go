package guest

import (
	"fmt"
	"io"
	"io/fs"
)

// newcWriter writes a cpio archive in the "newc" (SVR4, no CRC) format the
// kernel unpacks as an initramfs: a 110-byte ASCII header of 13 hex fields,
// the NUL-terminated name padded to 4 bytes, the data padded to 4 bytes, and
// a TRAILER!!! entry at the end.
type newcWriter struct {
	w   io.Writer
	ino uint32
	err error
}

const (
	cpioDir     = 0o040000
	cpioFile    = 0o100000
	cpioSymlink = 0o120000
	cpioCharDev = 0o020000
)

func (c *newcWriter) entry(name string, mode uint32, data []byte, rdevMajor, rdevMinor uint32) {
	if c.err != nil {
		return
	}
	c.ino++
	nlink := uint32(1)
	if mode&0o170000 == cpioDir {
		nlink = 2
	}
	hdr := fmt.Sprintf("070701%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		c.ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdevMajor, rdevMinor, len(name)+1, 0)
	buf := make([]byte, 0, len(hdr)+len(name)+4+len(data)+3)
	buf = append(buf, hdr...)
	buf = append(buf, name...)
	buf = append(buf, 0)
	buf = pad4(buf)
	buf = append(buf, data...)
	buf = pad4(buf)
	_, c.err = c.w.Write(buf)
}

func pad4(b []byte) []byte {
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

// Dir adds a directory (name without a leading slash, e.g. "bin").
func (c *newcWriter) Dir(name string) { c.entry(name, cpioDir|0o755, nil, 0, 0) }

// File adds a regular file.
func (c *newcWriter) File(name string, perm fs.FileMode, data []byte) {
	c.entry(name, cpioFile|uint32(perm.Perm()), data, 0, 0)
}

// Symlink adds a symbolic link to target.
func (c *newcWriter) Symlink(name, target string) {
	c.entry(name, cpioSymlink|0o777, []byte(target), 0, 0)
}

// CharDev adds a character device node.
func (c *newcWriter) CharDev(name string, perm fs.FileMode, major, minor uint32) {
	c.entry(name, cpioCharDev|uint32(perm.Perm()), nil, major, minor)
}

// Close writes the trailer and returns the first error.
func (c *newcWriter) Close() error {
	c.entry("TRAILER!!!", 0, nil, 0, 0)
	return c.err
}
