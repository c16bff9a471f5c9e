package wire

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/vtpmm/vtpmm/migrate"
	"github.com/vtpmm/vtpmm/vtpm"
)

func TestErrorMapping(t *testing.T) {
	p := newPKI(t, "ca", "host-a", "host-b")
	fp := &fakePeer{}
	addr := serve(t, fp, p.server(t, "host-b"))
	c := client(t, p, "host-a", addr)
	for _, tc := range []struct {
		sentinel error
		reason   string
		code     codes.Code
	}{
		{migrate.ErrBusy, "ERR_BUSY", codes.Aborted},
		{migrate.ErrReplay, "ERR_REPLAY", codes.AlreadyExists},
		{migrate.ErrUnknownTx, "ERR_UNKNOWN_TX", codes.NotFound},
		{migrate.ErrBadMessage, "ERR_BAD_MESSAGE", codes.InvalidArgument},
		{migrate.ErrRefused, "ERR_REFUSED", codes.FailedPrecondition},
		{migrate.ErrNotOwner, "ERR_NOT_OWNER", codes.FailedPrecondition},
		{migrate.ErrHypervisor, "ERR_HYPERVISOR", codes.Internal},
		{migrate.ErrUnresolved, "ERR_UNRESOLVED", codes.Aborted},
		{migrate.ErrPeer, "ERR_PEER", codes.Unavailable},
		{migrate.ErrCrash, "ERR_CRASH", codes.Internal},
		{vtpm.ErrStaleGeneration, "ERR_STALE_GENERATION", codes.FailedPrecondition},
		{vtpm.ErrWrongKey, "ERR_WRONG_KEY", codes.InvalidArgument},
		{vtpm.ErrKeyExists, "ERR_KEY_EXISTS", codes.AlreadyExists},
		{vtpm.ErrKeyNotFound, "ERR_KEY_NOT_FOUND", codes.NotFound},
	} {
		t.Run(tc.reason, func(t *testing.T) {
			orig := fmt.Errorf("status %s: %w: detail 42", tx, tc.sentinel)
			fp.setStatus(func(context.Context, *migrate.StatusRequest) (*migrate.StatusResponse, error) { return nil, orig })
			_, err := statusCall(t, c, "host-b", "host-a")
			if !errors.Is(err, tc.sentinel) {
				t.Fatalf("%v: not %v", err, tc.sentinel)
			}
			if got := status.Code(err); got != tc.code {
				t.Fatalf("code %v, want %v", got, tc.code)
			}
			if !strings.Contains(err.Error(), orig.Error()) || !strings.Contains(err.Error(), "host-b") {
				t.Fatalf("message %q does not keep %q", err, orig)
			}
			var re *RemoteError
			if !errors.As(err, &re) || re.Reasons[0] != tc.reason {
				t.Fatalf("reasons %+v", re)
			}
			if tc.sentinel != migrate.ErrPeer && errors.Is(err, migrate.ErrPeer) {
				t.Fatalf("%v also matches ErrPeer", err)
			}
		})
	}
	t.Run("two sentinels", func(t *testing.T) {
		fp.setStatus(func(context.Context, *migrate.StatusRequest) (*migrate.StatusResponse, error) {
			return nil, fmt.Errorf("prepare: %w: VM x: %w", migrate.ErrBadMessage, vtpm.ErrWrongKey)
		})
		_, err := statusCall(t, c, "host-b", "host-a")
		if !errors.Is(err, migrate.ErrBadMessage) || !errors.Is(err, vtpm.ErrWrongKey) || status.Code(err) != codes.InvalidArgument {
			t.Fatalf("%v (%v)", err, status.Code(err))
		}
	})
	t.Run("no sentinel", func(t *testing.T) {
		fp.setStatus(func(context.Context, *migrate.StatusRequest) (*migrate.StatusResponse, error) {
			return nil, errors.New("TPM said no")
		})
		_, err := statusCall(t, c, "host-b", "host-a")
		if !errors.Is(err, migrate.ErrPeer) || status.Code(err) != codes.Unknown || !strings.Contains(err.Error(), "TPM said no") {
			t.Fatalf("%v (%v)", err, status.Code(err))
		}
	})
	t.Run("deadline", func(t *testing.T) {
		fp.setStatus(func(ctx context.Context, _ *migrate.StatusRequest) (*migrate.StatusResponse, error) {
			<-ctx.Done()
			return nil, ctx.Err()
		})
		peer, _ := c.Dial(context.Background(), "host-b")
		ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
		defer cancel()
		start := time.Now()
		_, err := peer.Status(ctx, &migrate.StatusRequest{TxID: tx, From: "host-a"})
		if !errors.Is(err, migrate.ErrPeer) || !errors.Is(err, context.DeadlineExceeded) || status.Code(err) != codes.DeadlineExceeded {
			t.Fatalf("%v (%v)", err, status.Code(err))
		}
		if d := time.Since(start); d > 3*time.Second {
			t.Fatalf("deadline not respected: %v", d)
		}
	})
	t.Run("default call timeout", func(t *testing.T) {
		c2 := client(t, p, "host-a", addr, WithCallTimeout(200*time.Millisecond))
		peer, _ := c2.Dial(context.Background(), "host-b")
		_, err := peer.Status(context.Background(), &migrate.StatusRequest{TxID: tx, From: "host-a"})
		if !errors.Is(err, migrate.ErrPeer) || status.Code(err) != codes.DeadlineExceeded {
			t.Fatalf("%v (%v)", err, status.Code(err))
		}
	})
	fp.setStatus(nil)
}

func TestStrictDecoding(t *testing.T) {
	p := newPKI(t, "ca", "host-a", "host-b")
	fp := &fakePeer{}
	addr := serve(t, fp, p.server(t, "host-b"))
	c := client(t, p, "host-a", addr)
	if _, err := c.Dial(context.Background(), "host-b"); err != nil {
		t.Fatal(err)
	}
	cc := c.conns["host-b"].cc
	for _, tc := range []struct{ method, body string }{
		{MethodStatus, `{"tx":"` + tx + `","from":"host-a","evil":1}`},
		{MethodStatus, `{"tx":"` + tx + `","from":"host-a"} {}`},
		{MethodEvidence, `[]`},
		{MethodPrepare, `{"version":1,"tx":"` + tx + `","source":"host-a","dest":"host-b"}`},
		{MethodFinish, `{"version":2,"tx":"` + tx + `","source":"host-a"}`},
		{MethodFinish, `not json`},
	} {
		var out rawMessage
		msg := rawMessage(tc.body)
		err := cc.Invoke(context.Background(), FullMethod(tc.method), &msg, &out)
		err = fromStatus(context.Background(), "host-b", tc.method, err)
		if !errors.Is(err, migrate.ErrBadMessage) || status.Code(err) != codes.InvalidArgument {
			t.Errorf("%s %s: %v", tc.method, tc.body, err)
		}
	}
	if fp.calls != 0 {
		t.Fatalf("the node saw %d malformed requests", fp.calls)
	}
	// Too large for the wire.
	peer, _ := c.Dial(context.Background(), "host-b")
	_, err := peer.Status(context.Background(), &migrate.StatusRequest{TxID: tx, From: "host-a", VMs: []string{strings.Repeat("x", MaxMessageSize)}})
	if !errors.Is(err, migrate.ErrPeer) || status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("oversized: %v (%v)", err, status.Code(err))
	}
}
