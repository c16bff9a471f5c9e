package vtpm_test

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2"

	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/tpmtest"
)

func TestOpenRefusesBadURIs(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		uri  string
		want error
	}{
		{"", vtpm.ErrBadURI},
		{"tpm0", vtpm.ErrBadURI},
		{"mssim://127.0.0.1:2321", vtpm.ErrBadURI},
		{"device://", vtpm.ErrBadURI},
		{"swtpm+tcp://", vtpm.ErrBadURI},
		{"swtpm+unix://", vtpm.ErrBadURI},
		{"swtpm+tcp://%zz", vtpm.ErrBadURI},
		{"device:///nonexistent/tpmrm0", vtpm.ErrTPMUnavailable},
		{"swtpm+unix:///nonexistent/swtpm.sock", vtpm.ErrTPMUnavailable},
		{"swtpm+tcp://127.0.0.1:1", vtpm.ErrTPMUnavailable},
	}
	for _, tc := range tests {
		t.Run(tc.uri, func(t *testing.T) {
			tpm, err := vtpm.Open(ctx, tc.uri)
			if err == nil {
				tpm.Close()
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("Open(%q) = %v, want %v", tc.uri, err, tc.want)
			}
			if !strings.Contains(err.Error(), tc.uri) {
				t.Fatalf("error does not name the URI: %v", err)
			}
		})
	}
}

// TestOpenSwtpmTCP reaches a real swtpm through a TCP listener on loopback
// that forwards to its unix socket: the swtpm+tcp path end to end.
func TestOpenSwtpmTCP(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	h := tpmtest.StartHost(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		u, err := net.Dial("unix", strings.TrimPrefix(h.URI(), "swtpm+unix://"))
		if err != nil {
			return
		}
		go func() {
			_, _ = io.Copy(u, c)
			u.Close() // free swtpm's single connection when the client leaves
		}()
		_, _ = io.Copy(c, u)
	}()
	raw, err := vtpm.Open(ctx, "swtpm+tcp://"+ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	m := vtpm.NewMeter(raw, vtpm.ProfileNone)
	defer m.Close()
	for i := 0; i < 3; i++ {
		if _, err := (tpm2.GetRandom{BytesRequested: 16}).Execute(m); err != nil {
			t.Fatalf("GetRandom over swtpm+tcp: %v", err)
		}
	}
	if _, err := vtpm.ReadPCRs(m, vtpm.DefaultPCRs); err != nil {
		t.Fatal(err)
	}
	st := m.Stats()
	if st.ByCode[tpm2.TPMCCGetRandom] != 3 || st.ByCode[tpm2.TPMCCPCRRead] != 1 || st.Total != 4 {
		t.Fatalf("meter counted %s", st)
	}
}

// TestStreamResendsOnRetry: a TPM that answers TPM_RC_RETRY has not started
// the command; the transport resends it unchanged.
func TestStreamResendsOnRetry(t *testing.T) {
	client, server := net.Pipe()
	tpm := vtpm.NewStreamTPM(client)
	defer tpm.Close()
	var seen [][]byte
	go func() {
		for i := 0; ; i++ {
			hdr := make([]byte, 10)
			if _, err := io.ReadFull(server, hdr); err != nil {
				return
			}
			body := make([]byte, binary.BigEndian.Uint32(hdr[2:6])-10)
			_, _ = io.ReadFull(server, body)
			seen = append(seen, append(hdr, body...))
			rc := uint32(tpm2.TPMRCRetry)
			if i >= 2 {
				rc = 0
			}
			rsp := make([]byte, 10)
			binary.BigEndian.PutUint16(rsp[0:2], 0x8001)
			binary.BigEndian.PutUint32(rsp[2:6], 10)
			binary.BigEndian.PutUint32(rsp[6:10], rc)
			_, _ = server.Write(rsp)
		}
	}()
	cmd := []byte{0x80, 0x01, 0, 0, 0, 12, 0, 0, 1, 0x7b, 0, 8}
	rsp, err := tpm.Send(cmd)
	if err != nil {
		t.Fatal(err)
	}
	if rc := binary.BigEndian.Uint32(rsp[6:10]); rc != 0 {
		t.Fatalf("final rc 0x%x", rc)
	}
	if len(seen) != 3 || string(seen[2]) != string(cmd) {
		t.Fatalf("sent %d times, want 3 identical sends", len(seen))
	}
}

func TestClassAndProfiles(t *testing.T) {
	tests := []struct {
		cc   tpm2.TPMCC
		want vtpm.CommandClass
		dtpm string
	}{
		{tpm2.TPMCCUnseal, vtpm.ClassHandle, "50ms"},
		{tpm2.TPMCCQuote, vtpm.ClassAsym, "200ms"},
		{tpm2.TPMCCImport, vtpm.ClassAsym, "200ms"},
		{tpm2.TPMCCECDHZGen, vtpm.ClassAsym, "200ms"},
		{tpm2.TPMCCCreatePrimary, vtpm.ClassKeyGen, "300ms"},
	}
	for _, tc := range tests {
		if got := vtpm.ClassOf(tc.cc); got != tc.want {
			t.Errorf("%s: class %v, want %v", vtpm.CommandName(tc.cc), got, tc.want)
		}
		if got := vtpm.ProfileDTPM.Latency(tc.cc).String(); got != tc.dtpm {
			t.Errorf("%s: dtpm %s, want %s", vtpm.CommandName(tc.cc), got, tc.dtpm)
		}
		if vtpm.ProfileNone.Latency(tc.cc) != 0 {
			t.Errorf("none profile injects latency")
		}
	}
	for _, n := range []string{"none", "ftpm", "dtpm"} {
		if p, err := vtpm.ProfileByName(n); err != nil || p.Name != n {
			t.Errorf("ProfileByName(%s): %v", n, err)
		}
	}
	if _, err := vtpm.ProfileByName("slow"); err == nil {
		t.Error("unknown profile accepted")
	}
	if vtpm.CommandName(0xdead) != "CC_0x0000dead" || vtpm.CommandName(tpm2.TPMCCUnseal) != "Unseal" {
		t.Error("CommandName")
	}
}
