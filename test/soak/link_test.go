package soak_test

import (
	"bufio"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/test/soak"
)

// echoServer answers every line with the same line.
func echoServer(t *testing.T) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = lis.Close() })
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			go func() { _, _ = io.Copy(c, c); _ = c.Close() }()
		}
	}()
	return lis.Addr().String()
}

// roundTrip sends a line through c and reads the answer within d.
func roundTrip(c net.Conn, r *bufio.Reader, d time.Duration) error {
	_ = c.SetDeadline(time.Now().Add(d))
	if _, err := c.Write([]byte("ping\n")); err != nil {
		return err
	}
	line, err := r.ReadString('\n')
	if err == nil && line != "ping\n" {
		return errors.New("garbled: " + line)
	}
	return err
}

func dial(t *testing.T, l *soak.Link) (net.Conn, *bufio.Reader) {
	t.Helper()
	c, err := net.Dial("tcp", l.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c, bufio.NewReader(c)
}

// TestLink: a link forwards while up; drop resets its connections and
// refuses new ones (an error at once); a blackhole swallows bytes without
// an answer (a timeout), and its connections are reset when it heals;
// after the heal, new connections work again.
func TestLink(t *testing.T) {
	addr := echoServer(t)
	l, err := soak.NewLink("a>b", func() string { return addr })
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	c, r := dial(t, l)
	if err := roundTrip(c, r, 5*time.Second); err != nil {
		t.Fatalf("up: %v", err)
	}

	l.Set(soak.LinkDrop)
	if err := roundTrip(c, r, 5*time.Second); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("dropped connection: %v, want a reset", err)
	}
	if c2, err := net.Dial("tcp", l.Addr()); err == nil {
		defer c2.Close()
		if err := roundTrip(c2, bufio.NewReader(c2), 5*time.Second); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("new connection on a dropped link: %v, want a reset", err)
		}
	}

	l.Set(soak.LinkUp)
	c3, r3 := dial(t, l)
	if err := roundTrip(c3, r3, 5*time.Second); err != nil {
		t.Fatalf("healed: %v", err)
	}
	l.Set(soak.LinkBlackhole)
	if err := roundTrip(c3, r3, 300*time.Millisecond); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("blackholed connection: %v, want a timeout", err)
	}
	c4, r4 := dial(t, l)
	if err := roundTrip(c4, r4, 300*time.Millisecond); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("new connection in a blackhole: %v, want a timeout", err)
	}
	l.Set(soak.LinkUp)
	for _, cr := range []struct {
		c net.Conn
		r *bufio.Reader
	}{{c3, r3}, {c4, r4}} {
		if err := roundTrip(cr.c, cr.r, 5*time.Second); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("connection that lost bytes, after the heal: %v, want a reset", err)
		}
	}
	c5, r5 := dial(t, l)
	if err := roundTrip(c5, r5, 5*time.Second); err != nil {
		t.Fatalf("healed after a blackhole: %v", err)
	}
}
