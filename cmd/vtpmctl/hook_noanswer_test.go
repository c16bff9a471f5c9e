package main

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vtpmm/vtpmm/internal/adminapi"
)

// silentVtpmd listens on an admin socket, accepts every connection, reads
// the request and never answers (a vtpmd that runs but is stuck).
func silentVtpmd(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("/tmp", "vtpmctl-hook-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "vtpmd.sock")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lis.Close() })
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { c.Close() })
			go func() { _, _ = io.Copy(io.Discard, c) }()
		}
	}()
	return sock
}

// TestHookFailsClosedWhenVtpmdSlow: a vtpmd that accepts the hook's call
// and does not answer within the hook's deadline (adminapi.HookTimeout in
// production; 300 ms here) fails 'prepare begin' closed: exit 2 with the
// rule vtpmd-answers in the message libvirt shows. An incoming migration
// is refused too; 'release end' never fails. A vtpmd that is not running
// (no socket: TestHookInstall; a socket nobody listens on: here) lets the
// start go on, as before.
func TestHookFailsClosedWhenVtpmdSlow(t *testing.T) {
	const vm = "6f1c3a52-0c41-4d1c-9d55-3f1e7c2b9a10"
	slow := adminapi.NewClient(silentVtpmd(t))
	call := func(c *adminapi.Client, op, subop string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		defer cancel()
		var errb strings.Builder
		err := runQemuHook(ctx, c, op, subop, strings.NewReader(domainXML("web-1", vm)), &errb)
		return errb.String(), err
	}

	_, err := call(slow, "prepare", "begin")
	if err == nil || !errors.Is(err, adminapi.ErrNoAnswer) || exitCode(err) != 2 || !strings.Contains(err.Error(), "rule vtpmd-answers") {
		t.Fatalf("prepare begin, vtpmd silent: got %v (exit %d), want a refusal with exit 2 naming the rule vtpmd-answers", err, exitCode(err))
	}
	t.Logf("prepare begin, vtpmd silent: exit %d: %v", exitCode(err), err)
	if _, err := call(slow, "migrate", "begin"); err == nil || !errors.Is(err, adminapi.ErrNoAnswer) {
		t.Fatalf("migrate begin, vtpmd silent: got %v, want a refusal", err)
	}
	if _, err := call(slow, "release", "end"); err != nil {
		t.Fatalf("release end, vtpmd silent: got %v, want nil (never fails)", err)
	}

	// vtpmd not running: its socket file is left, nobody listens.
	dir, err := os.MkdirTemp("/tmp", "vtpmctl-hook-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "vtpmd.sock")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	lis.(*net.UnixListener).SetUnlinkOnClose(false)
	lis.Close()
	msg, err := call(adminapi.NewClient(sock), "prepare", "begin")
	if err != nil || !strings.Contains(msg, "goes on") {
		t.Fatalf("prepare begin, vtpmd not running: got %v (%q), want the start to go on", err, msg)
	}
}
