package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"

	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/tpmtest"
)

// bootPCR is PCR 16 after one boot: extend(zeros, sha256(marker)).
func bootPCR() string {
	m := sha256.Sum256([]byte(DefaultBootMarker))
	v := sha256.Sum256(append(make([]byte, 32), m[:]...))
	return hex.EncodeToString(v[:])
}

func runServe(t *testing.T, uri string, count int) []string {
	t.Helper()
	var out, errb bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err := Run(ctx, []string{"--tpm", uri, "serve", "--interval", "10ms", "--count", fmt.Sprint(count), "--wait", "0s"}, &out, &errb)
	if err != nil {
		t.Fatalf("serve: %v (stderr %q)", err, errb.String())
	}
	return strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n")
}

func TestServe(t *testing.T) {
	t.Parallel()
	h := tpmtest.StartHost(t)
	uri := h.URI()
	want := bootPCR()

	// First boot: extend, seal a fresh secret, unseal it every tick.
	lines := runServe(t, uri, 2)
	if len(lines) != 4 || lines[0] != "VTPMM-BOOT pcr16="+want+" extended" || !strings.HasPrefix(lines[1], "VTPMM-SEALED ") {
		t.Fatalf("first boot:\n%s", strings.Join(lines, "\n"))
	}
	secret := strings.TrimPrefix(lines[1], "VTPMM-SEALED ")
	if !regexp.MustCompile(`^[0-9a-f]{32}$`).MatchString(secret) {
		t.Fatalf("secret %q is not 16 random bytes in hex", secret)
	}
	for i, l := range lines[2:] {
		if w := fmt.Sprintf("VTPMM-UNSEAL %d %s pcr16=%s", i+1, secret, want); l != w {
			t.Errorf("tick %d: %q, want %q", i+1, l, w)
		}
	}

	// serve restarted in the same boot: PCR kept, the same secret found.
	lines = runServe(t, uri, 1)
	if w := []string{"VTPMM-BOOT pcr16=" + want + " kept", "VTPMM-FOUND " + secret,
		"VTPMM-UNSEAL 1 " + secret + " pcr16=" + want}; strings.Join(lines, "\n") != strings.Join(w, "\n") {
		t.Errorf("restart in the same boot:\n%s\nwant\n%s", strings.Join(lines, "\n"), strings.Join(w, "\n"))
	}

	// Reboot (swtpm restart: PCRs reset, persistent objects kept): extended
	// again to the same value, the same secret unseals.
	ctx := context.Background()
	if err := h.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	lines = runServe(t, uri, 1)
	if len(lines) != 3 || lines[0] != "VTPMM-BOOT pcr16="+want+" extended" || lines[1] != "VTPMM-FOUND "+secret {
		t.Errorf("after reboot:\n%s", strings.Join(lines, "\n"))
	}

	// PCR 16 moves on (a state that did not survive would look like this):
	// the ticks report the policy failure and the PCR value.
	tpm, err := vtpm.Open(ctx, uri)
	if err != nil {
		t.Fatal(err)
	}
	d := sha256.Sum256([]byte("tamper"))
	_, err = tpm2.PCRExtend{
		PCRHandle: tpm2.AuthHandle{Handle: 16, Auth: tpm2.PasswordAuth(nil)},
		Digests:   tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: d[:]}}},
	}.Execute(tpm)
	_ = tpm.Close()
	if err != nil {
		t.Fatal(err)
	}
	lines = runServe(t, uri, 1)
	if len(lines) != 3 || !strings.HasPrefix(lines[0], "VTPMM-BOOT pcr16=") || !strings.HasSuffix(lines[0], " kept") ||
		!strings.HasPrefix(lines[1], "VTPMM-ERROR ") || !strings.Contains(lines[1], "PCR 16 differ") ||
		!regexp.MustCompile(`^VTPMM-UNSEAL 1 ERROR pcr16=[0-9a-f]{64} .*PCR 16 differ`).MatchString(lines[2]) {
		t.Errorf("after an extra extend:\n%s", strings.Join(lines, "\n"))
	}
}

func TestServeUsage(t *testing.T) {
	t.Parallel()
	for _, args := range [][]string{
		{"serve", "--pcr", "24"},
		{"serve", "--interval", "0s"},
		{"serve", "--count", "-1"},
		{"serve", "extra"},
	} {
		var out, errb bytes.Buffer
		if err := Run(context.Background(), args, &out, &errb); !errors.Is(err, errUsage) {
			t.Errorf("%v: %v, want usage error", args, err)
		}
	}
}

func TestServeNoTPM(t *testing.T) {
	t.Parallel()
	var out, errb bytes.Buffer
	err := Run(context.Background(), []string{"--tpm", "device:///nonexistent/tpmrm0", "serve", "--wait", "200ms"}, &out, &errb)
	if !errors.Is(err, vtpm.ErrTPMUnavailable) {
		t.Errorf("serve without a TPM: %v, want ErrTPMUnavailable", err)
	}
}
