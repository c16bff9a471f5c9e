package soak

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
)

// LinkState is what a link does with the bytes it carries.
type LinkState int

// States of a link.
const (
	// LinkUp forwards every byte both ways.
	LinkUp LinkState = iota
	// LinkDrop resets the connections open and refuses new ones at once
	// (a host that is gone: the peer sees a reset).
	LinkDrop
	// LinkBlackhole accepts connections and swallows what they carry in
	// both directions without an answer (a partition: the peer waits
	// for its timeouts). Connections that lost bytes are reset when the
	// link heals, as TCP would have timed them out.
	LinkBlackhole
)

func (s LinkState) String() string {
	return [...]string{"up", "drop", "blackhole"}[s]
}

// Link is one direction of a network path between two parties: a
// loopback TCP proxy that a party dials instead of its peer (the fleet's
// configuration names the link's address: a host's static peer address,
// a registry endpoint). It forwards to the address target returns at
// dial time, so the peer may restart on the same address.
type Link struct {
	Name   string
	lis    net.Listener
	target func() string

	mu    sync.Mutex
	state LinkState
	conns map[*linkConn]struct{}
	done  bool
}

// linkConn is one proxied connection: the side the party dialled and the
// side to the peer (nil while blackholed before the dial).
type linkConn struct {
	in, out net.Conn
	lost    bool // bytes were swallowed: reset at heal
}

// NewLink listens on a loopback port and forwards to target().
func NewLink(name string, target func() string) (*Link, error) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("soak: link %s: %w", name, err)
	}
	l := &Link{Name: name, lis: lis, target: target, conns: map[*linkConn]struct{}{}}
	go l.accept()
	return l, nil
}

// newPairLink is a link without its own listener: a front (peerlink.go)
// hands it the connections of its pair.
func newPairLink(name string) *Link {
	return &Link{Name: name, conns: map[*linkConn]struct{}{}}
}

// Addr is the address the party dials ("" for a link behind a front).
func (l *Link) Addr() string {
	if l.lis == nil {
		return ""
	}
	return l.lis.Addr().String()
}

// State is the link's state.
func (l *Link) State() LinkState {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.state
}

// Set changes the link's state: drop resets every open connection; up
// after a blackhole resets the connections that lost bytes.
func (l *Link) Set(s LinkState) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.state = s
	for c := range l.conns {
		if s == LinkDrop || (s == LinkUp && c.lost) {
			l.closeLocked(c)
		}
		if s == LinkBlackhole {
			c.lost = true
		}
	}
}

// Close stops the link and its connections.
func (l *Link) Close() error {
	l.mu.Lock()
	l.done = true
	for c := range l.conns {
		l.closeLocked(c)
	}
	l.mu.Unlock()
	if l.lis == nil {
		return nil
	}
	return l.lis.Close()
}

// reset closes c with a TCP reset, not a graceful close.
func reset(c net.Conn) {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetLinger(0)
	}
	_ = c.Close()
}

func (l *Link) closeLocked(c *linkConn) {
	reset(c.in)
	if c.out != nil {
		_ = c.out.Close()
	}
	delete(l.conns, c)
}

func (l *Link) accept() {
	for {
		in, err := l.lis.Accept()
		if err != nil {
			return
		}
		go l.serve(in, func() (net.Conn, error) { return net.Dial("tcp", l.target()) })
	}
}

// serve forwards in to the connection dial makes, as the link's state
// says.
func (l *Link) serve(in net.Conn, dial func() (net.Conn, error)) {
	c := &linkConn{in: in}
	l.mu.Lock()
	state, done := l.state, l.done
	if state == LinkDrop || done {
		l.mu.Unlock()
		reset(in)
		return
	}
	l.conns[c] = struct{}{}
	if state == LinkBlackhole {
		c.lost = true
		l.mu.Unlock()
		_, _ = io.Copy(io.Discard, in) // until the heal or drop resets it
		l.mu.Lock()
		if _, open := l.conns[c]; open {
			l.closeLocked(c)
		}
		l.mu.Unlock()
		return
	}
	l.mu.Unlock()
	out, err := dial()
	l.mu.Lock()
	if _, open := l.conns[c]; err != nil || !open {
		if err == nil {
			_ = out.Close()
		}
		if open {
			l.closeLocked(c)
		}
		l.mu.Unlock()
		return
	}
	c.out = out
	l.mu.Unlock()
	go l.pipe(c, out, in)
	l.pipe(c, in, out)
}

// pipe copies src to dst while the link is up; in a blackhole it reads
// and swallows.
func (l *Link) pipe(c *linkConn, src, dst net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			l.mu.Lock()
			state := l.state
			l.mu.Unlock()
			if state == LinkUp {
				if _, werr := dst.Write(buf[:n]); werr != nil {
					err = werr
				}
			}
		}
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				l.mu.Lock()
				if _, open := l.conns[c]; open {
					l.closeLocked(c)
				}
				l.mu.Unlock()
			}
			return
		}
	}
}
