package migrate_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/vtpm"
)

type vtpmConn = transport.TPM

func fmtUUID(b []byte) string {
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

func (h *host) withVTPM(vm string, f func(context.Context, vtpmConn) error) {
	t, ctx := h.f.t, context.Background()
	t.Helper()
	uri, err := h.hyp.VTPMURI(vm)
	if err != nil {
		t.Fatalf("%s: vTPM of %s: %v", h.name, vm, err)
	}
	tpm, err := vtpm.Open(ctx, uri)
	if err != nil {
		t.Fatal(err)
	}
	defer tpm.Close()
	if err := f(ctx, tpm); err != nil {
		t.Fatalf("%s: guest on %s: %v", h.name, vm, err)
	}
}

// setCrash makes host crash at its next crash point p (ErrCrash, the
// process gone); p "" lifts it.
func (f *fleet) setCrash(host string, p migrate.CrashPoint) {
	f.crashMu.Lock()
	defer f.crashMu.Unlock()
	if p == "" {
		delete(f.crash, host)
		return
	}
	f.crash[host] = migrate.CrashAt(p)
}

// migrateCrashing migrates vm from h to dest while h crashes at p, then
// lifts the crash: the migration must end in ErrCrash.
func (h *host) migrateCrashing(ctx context.Context, vm, dest string, p migrate.CrashPoint) {
	t := h.f.t
	t.Helper()
	h.f.setCrash(h.name, p)
	_, err := h.node.Migrate(ctx, migrate.Request{VMs: []string{vm}, Dest: dest}, nil)
	h.f.setCrash(h.name, "")
	if !errors.Is(err, migrate.ErrCrash) {
		t.Fatalf("migration of %s from %s to %s with a crash at %s: %v, want ErrCrash", vm, h.name, dest, p, err)
	}
}

// hookFleet is a fleet in hook mode (the hooks of every host installed)
// with the named hosts (host-c boots the bad log), its nodes' pull lease
// pullLease (0: the default).
func hookFleet(t *testing.T, pullLease time.Duration, names ...string) (*fleet, []*host) {
	t.Helper()
	f := newFleet(t)
	f.pullLease = pullLease
	hs := make([]*host, len(names))
	for i, n := range names {
		log := goodLog
		if n == "host-c" {
			log = badLog
		}
		hs[i] = f.addHost(n, log)
	}
	f.hookMode()
	return f, hs
}

// sealedVM creates VM name on h and seals secret in its guest's vTPM.
func (h *host) sealedVM(name string, secret []byte) string {
	vm := h.createVM(name)
	h.guestSeal(vm, secret)
	return vm
}

// settleMoved has h, the source of a plain migration of vm, settle it,
// then checks that dst alone owns vm and that its guest unseals secret.
func (h *host) settleMoved(ctx context.Context, vm string, dst *host, secret []byte) {
	t := h.f.t
	t.Helper()
	if err := h.node.Settle(ctx, vm); err != nil {
		t.Fatalf("settle on %s: %v", h.name, err)
	}
	h.f.checkSingleOwner(vm, dst.name)
	if got := dst.guestUnseal(vm); !bytes.Equal(got, secret) {
		t.Fatalf("guest secret on %s: %q", dst.name, got)
	}
}

// twoHosts is a fleet of host-a and host-b, with the registry reg ("none":
// without one; else useRegistry's kind).
func twoHosts(t *testing.T, reg string) (*fleet, *host, *host) {
	t.Helper()
	f := newFleet(t)
	if reg != "none" {
		f.useRegistry(reg)
	}
	return f, f.addHost("host-a", goodLog), f.addHost("host-b", goodLog)
}
