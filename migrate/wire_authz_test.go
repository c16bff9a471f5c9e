package migrate_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/vtpmm/vtpmm/internal/errclass"
	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/vtpm"
)

// TestWireDestinationErrors: over the agent wire, what a destination
// refuses or fails reaches the source as what it is, with its class and
// code, never as "peer agent unavailable": an unenrolled caller
// (ERR_DENIED), an out-of-range PCR (ERR_BAD_MESSAGE), a transfer key its
// TPM cannot unwrap (ERR_TPM), a full disk (ERR_NO_SPACE). Each after the
// honest twin.
func TestWireDestinationErrors(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	f := newFleet(t)
	a, b := f.addHost("host-a", goodLog), f.addHost("host-b", goodLog)
	w := newWireNet(f, a, b)
	w.issue("host-u") // a fleet certificate, no enrolment
	vm := a.createVM("vm1")
	nonce := bytes.Repeat([]byte{3}, 32)
	peer, err := w.clients["host-a"].Dial(ctx, "host-b")
	if err != nil {
		t.Fatal(err)
	}
	notPeer := func(what string, err error, want error, class errclass.Class, code codes.Code) {
		t.Helper()
		if !errors.Is(err, want) || !errors.Is(err, class) || errors.Is(err, migrate.ErrPeer) || status.Code(err) != code {
			t.Fatalf("%s: %v (gRPC %v), want class %s, %v, and not ErrPeer", what, err, status.Code(err), class, code)
		}
		t.Logf("%s: %v", what, err)
	}

	// Evidence: the honest twin, then an unenrolled caller, then bad PCRs.
	if _, err := peer.Evidence(ctx, &migrate.EvidenceRequest{Version: migrate.ProtocolVersion, Nonce: nonce, Source: "host-a"}); err != nil {
		t.Fatalf("honest evidence over the wire: %v", err)
	}
	up, err := w.client("host-u").Dial(ctx, "host-b")
	if err != nil {
		t.Fatal(err)
	}
	_, err = up.Evidence(ctx, &migrate.EvidenceRequest{Version: migrate.ProtocolVersion, Nonce: nonce, Source: "host-u"})
	notPeer("evidence for an unenrolled host", err, migrate.ErrDenied, errclass.Denied, codes.PermissionDenied)
	_, err = peer.Evidence(ctx, &migrate.EvidenceRequest{Version: migrate.ProtocolVersion, Nonce: nonce, Source: "host-a",
		PCRs: map[attestBank][]int{"sha256": {0, 99}}})
	notPeer("evidence over PCR 99", err, migrate.ErrBadMessage, errclass.BadMessage, codes.InvalidArgument)

	// A transfer key wrapped for another TPM's migration key: the
	// destination's TPM cannot unwrap it.
	k, _ := vtpm.NewVMKey(rand.Reader)
	defer k.Destroy()
	req := &migrate.PrepareRequest{Version: migrate.ProtocolVersion, TxID: newTx(t), Source: "host-a", Dest: "host-b", EvidenceDigest: bytes.Repeat([]byte{7}, 32)}
	if err := migrate.ForgePrepare(rand.Reader, a.ident.MK.Public, req, []migrate.TxVM{{UUID: vm, Generation: 2}}, map[string]vtpm.VMKey{vm: k}); err != nil {
		t.Fatal(err)
	}
	_, err = peer.Prepare(ctx, req)
	notPeer("a transfer key the destination's TPM cannot unwrap", err, migrate.ErrDestTPM, errclass.TPM, codes.Internal)
	if files := b.pendingKeyFiles(vm); len(files) > 0 {
		t.Fatalf("pending key left: %v", files)
	}

	// A full disk on the destination: its key store on a tiny tmpfs, full.
	keysDir := filepath.Join(b.dir, "keys")
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", keysDir).CombinedOutput(); err != nil {
		t.Skipf("cannot mount a tmpfs (root needed): %v %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("umount", keysDir).Run() })
	filler := filepath.Join(keysDir, "filler")
	_ = os.WriteFile(filler, bytes.Repeat([]byte{0}, 80<<10), 0o600) // fails once full; what it wrote stays
	_, err = a.node.Migrate(ctx, migrate.Request{VMs: []string{vm}, Dest: "host-b"}, nil)
	notPeer("a full disk on the destination", err, migrate.ErrNoSpace, errclass.NoSpace, codes.ResourceExhausted)
	if errclass.CodeOf(err) != errclass.CodeAborted {
		t.Fatalf("code of a full disk: %s, want aborted", errclass.CodeOf(err))
	}
	f.checkSingleOwner(vm, "host-a")
	// Space again: the migration goes through.
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	if _, err := a.node.Migrate(ctx, migrate.Request{VMs: []string{vm}, Dest: "host-b"}, nil); err != nil {
		t.Fatalf("migration once the disk has space: %v", err)
	}
	f.checkSingleOwner(vm, "host-b")
}
