package adminapi

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// fakeSocket makes an admin socket path that behaves as mode says:
// "absent" (no file), "stale" (a socket file nobody listens on: vtpmd
// died), "silent" (accepts and never answers: vtpmd stuck) or "hangup"
// (accepts, reads the request and closes without an answer).
func fakeSocket(t *testing.T, mode string) string {
	t.Helper()
	dir, err := os.MkdirTemp("/tmp", "adminapi-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "vtpmd.sock")
	if mode == "absent" {
		return sock
	}
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	if mode == "stale" {
		lis.(*net.UnixListener).SetUnlinkOnClose(false)
		lis.Close()
		return sock
	}
	t.Cleanup(func() { lis.Close() })
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { c.Close() })
			go func() {
				if mode == "hangup" {
					buf := make([]byte, 4096)
					_, _ = c.Read(buf)
					c.Close()
					return
				}
				_, _ = io.Copy(io.Discard, c) // silent: read, never answer
			}()
		}
	}()
	return sock
}

// TestClientNoAnswer: a vtpmd that is not running (no socket, nobody
// listening) is ErrUnreachable; one that accepts the connection and does
// not answer before the deadline, or hangs up, is ErrNoAnswer and not
// ErrUnreachable (the qemu hook fails closed on it).
func TestClientNoAnswer(t *testing.T) {
	for _, tc := range []struct {
		mode string
		want error
		not  error
	}{
		{"absent", ErrUnreachable, ErrNoAnswer},
		{"stale", ErrUnreachable, ErrNoAnswer},
		{"silent", ErrNoAnswer, ErrUnreachable},
		{"hangup", ErrNoAnswer, ErrUnreachable},
	} {
		t.Run(tc.mode, func(t *testing.T) {
			c := NewClient(fakeSocket(t, tc.mode))
			ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
			defer cancel()
			_, err := c.HookPrepare(ctx, HookRequest{UUID: "6f1c3a52-0c41-4d1c-9d55-3f1e7c2b9a10", Name: "web-1"})
			if !errors.Is(err, tc.want) || errors.Is(err, tc.not) {
				t.Fatalf("%s: got %v, want %v and not %v", tc.mode, err, tc.want, tc.not)
			}
		})
	}
}
