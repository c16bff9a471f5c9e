package guestseal_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmm/vtpmm/internal/guestseal"
	"github.com/vtpmm/vtpmm/vtpm/tpmtest"
)

func extend(t *testing.T, tpm transport.TPM, pcr int, data string) {
	t.Helper()
	d := sha256.Sum256([]byte(data))
	_, err := tpm2.PCRExtend{
		PCRHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(pcr), Auth: tpm2.PasswordAuth(nil)},
		Digests:   tpm2.TPMLDigestValues{Digests: []tpm2.TPMTHA{{HashAlg: tpm2.TPMAlgSHA256, Digest: d[:]}}},
	}.Execute(tpm)
	if err != nil {
		t.Fatal(err)
	}
}

func TestSealUnseal(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	for _, tc := range []struct {
		name    string
		pcrs    []int
		after   func(t *testing.T, tpm transport.TPM)
		want    error
		changed string
	}{
		{name: "unchanged PCR 16", pcrs: []int{16}},
		{name: "unchanged PCRs 0,7,16", pcrs: []int{16, 0, 7}},
		{name: "other PCR extended", pcrs: []int{16}, after: func(t *testing.T, tpm transport.TPM) { extend(t, tpm, 15, "x") }},
		{name: "PCR 16 extended", pcrs: []int{16}, after: func(t *testing.T, tpm transport.TPM) { extend(t, tpm, 16, "evil") },
			want: guestseal.ErrPolicy, changed: "PCR 16 differ"},
		{name: "PCR 7 of 0,7 extended", pcrs: []int{0, 7}, after: func(t *testing.T, tpm transport.TPM) { extend(t, tpm, 7, "evil") },
			want: guestseal.ErrPolicy, changed: "PCR 7 differ"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, tpm := tpmtest.NewHost(t)
			extend(t, tpm, 16, "boot")
			secret := []byte("tenant disk key " + tc.name)
			if err := guestseal.Seal(ctx, tpm, secret, tc.pcrs); err != nil {
				t.Fatal(err)
			}
			tpmtest.CheckNoLeaks(t, tpm)
			if tc.after != nil {
				tc.after(t, tpm)
			}
			got, err := guestseal.Unseal(ctx, tpm)
			if !errors.Is(err, tc.want) {
				t.Fatalf("Unseal = %v, want %v", err, tc.want)
			}
			if tc.want == nil && !bytes.Equal(got, secret) {
				t.Fatalf("Unseal = %q, want %q", got, secret)
			}
			if tc.changed != "" && !strings.Contains(err.Error(), tc.changed) {
				t.Errorf("error %q does not name %q", err, tc.changed)
			}
		})
	}
}

func TestSealReplacesAndClear(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	_, tpm := tpmtest.NewHost(t)
	if _, err := guestseal.Unseal(ctx, tpm); !errors.Is(err, guestseal.ErrNotSealed) {
		t.Fatalf("Unseal on a fresh TPM = %v, want ErrNotSealed", err)
	}
	for _, s := range []string{"first", "second"} {
		if err := guestseal.Seal(ctx, tpm, []byte(s), []int{16}); err != nil {
			t.Fatal(err)
		}
	}
	got, err := guestseal.Unseal(ctx, tpm)
	if err != nil || string(got) != "second" {
		t.Fatalf("Unseal = %q, %v; want second", got, err)
	}
	if err := guestseal.Clear(ctx, tpm); err != nil {
		t.Fatal(err)
	}
	if _, err := guestseal.Unseal(ctx, tpm); !errors.Is(err, guestseal.ErrNotSealed) {
		t.Fatalf("Unseal after Clear = %v, want ErrNotSealed", err)
	}
}

func TestSealBadInput(t *testing.T) {
	t.Parallel()
	_, tpm := tpmtest.NewHost(t)
	for _, tc := range []struct {
		name   string
		secret []byte
		pcrs   []int
	}{
		{"empty secret", nil, []int{16}},
		{"huge secret", make([]byte, 129), []int{16}},
		{"no PCRs", []byte("s"), nil},
		{"PCR 24", []byte("s"), []int{24}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := guestseal.Seal(context.Background(), tpm, tc.secret, tc.pcrs); !errors.Is(err, guestseal.ErrBadInput) {
				t.Fatalf("Seal = %v, want ErrBadInput", err)
			}
		})
	}
}
