package errclass

import (
	"errors"
	"fmt"
	"testing"
)

var (
	errBusy       = New(Busy, "VM is already being migrated")
	errRefused    = New(Refused, "destination refused by attestation policy")
	errUnresolved = New(Unresolved, "transaction not resolved yet")
	errPeer       = New(Peer, "peer agent unavailable")
)

func TestTable(t *testing.T) {
	reasons := map[string]bool{}
	for _, c := range All() {
		if c.Reason() == "" || reasons[c.Reason()] || c.GRPCCode() == 0 || c.Code() == "" {
			t.Errorf("class %s: reason %q, gRPC %d, code %q (reasons must be unique)", c, c.Reason(), c.GRPCCode(), c.Code())
		}
		reasons[c.Reason()] = true
		if back, ok := ByReason(c.Reason()); !ok || back != c {
			t.Errorf("ByReason(%s) = %s", c.Reason(), back)
		}
	}
	if _, ok := ByReason("ERR_NOPE"); ok {
		t.Error("unknown reason found")
	}
}

func TestSentinelsAndCodes(t *testing.T) {
	for _, tc := range []struct {
		err  error
		code Code
		exit int
	}{
		{nil, CodeOK, 0},
		{errors.New("boom"), CodeError, 1},
		{fmt.Errorf("migrate: %w", errRefused), CodeRefused, 2},
		{fmt.Errorf("x: %w", errPeer), CodeAborted, 3},
		{fmt.Errorf("finish: %w: %w", errUnresolved, errPeer), CodeUnresolved, 4},
		{fmt.Errorf("x: %w", errBusy), CodeBusy, 5},
		{errors.Join(errBusy, errUnresolved), CodeUnresolved, 4},
		{errors.Join(errBusy, errRefused), CodeRefused, 2},
	} {
		if got := CodeOf(tc.err); got != tc.code {
			t.Errorf("CodeOf(%v) = %s, want %s", tc.err, got, tc.code)
		}
		if got := ExitCode(tc.err); got != tc.exit {
			t.Errorf("ExitCode(%v) = %d, want %d", tc.err, got, tc.exit)
		}
	}
	if !errors.Is(fmt.Errorf("a: %w", errBusy), Busy) || errors.Is(errBusy, Refused) {
		t.Error("a sentinel does not match its class only")
	}
}

// TestDecode: an error decoded from its reasons matches the sentinels of
// its classes, as errors.Is sees them, and keeps the sender's code.
func TestDecode(t *testing.T) {
	sent := fmt.Errorf("migrate to host-c: %w: %w", errRefused, errPeer)
	got := Decode(sent.Error(), CodeOf(sent), append(Reasons(sent), "ERR_FROM_THE_FUTURE"))
	if got.Error() != sent.Error() || got.Code != CodeRefused {
		t.Fatalf("decoded %q code %s", got, got.Code)
	}
	for _, target := range []error{errRefused, errPeer, Refused, Peer} {
		if !errors.Is(got, target) {
			t.Errorf("decoded error does not match %v", target)
		}
	}
	if errors.Is(got, errBusy) || errors.Is(got, Busy) {
		t.Error("decoded error matches a class it was not sent")
	}
	if ExitCode(fmt.Errorf("vtpmd: %w", got)) != 2 {
		t.Error("exit code of a decoded refusal is not 2")
	}
	if ExitCode(Decode("x", "", nil)) != 1 {
		t.Error("exit code of a decoded error without a code is not 1")
	}
}
