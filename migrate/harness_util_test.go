package migrate_test

import (
	"context"
	"fmt"

	"github.com/google/go-tpm/tpm2/transport"

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
