package migrate

import (
	"bytes"
	"encoding/binary"
	"strconv"
	"testing"

	"github.com/vtpmm/vtpmm/vtpm"
)

// oldTransferAD is the associated data the transfer envelope had before it
// went through vtpm.Binding: hosts of both builds must understand each
// other's Prepare.
func oldTransferAD(txID, vm string, gen uint64, src, dst string, evidenceDigest []byte) []byte {
	var b bytes.Buffer
	b.WriteString("vtpmm/transfer/v" + strconv.Itoa(ProtocolVersion))
	for _, f := range [][]byte{[]byte(txID), []byte(vm), []byte(src), []byte(dst), evidenceDigest} {
		_ = binary.Write(&b, binary.BigEndian, uint16(len(f)))
		b.Write(f)
	}
	_ = binary.Write(&b, binary.BigEndian, gen)
	return b.Bytes()
}

func TestTransferBinding(t *testing.T) {
	req := &PrepareRequest{TxID: "0123456789abcdef0123456789abcdef", Source: "host-a", Dest: "host-b", EvidenceDigest: bytes.Repeat([]byte{7}, 32)}
	const vm = "0e2e0e2e-0000-4000-8000-000000000001"
	got := transferBinding(req, vm, 3).AssociatedData()
	if want := oldTransferAD(req.TxID, vm, 3, req.Source, req.Dest, req.EvidenceDigest); !bytes.Equal(got, want) {
		t.Fatalf("transfer AD changed:\n%q\n%q", got, want)
	}
	// Domain separation: a key sealed for the transfer never opens as an
	// envelope at rest with the same fields, nor for another VM.
	s, err := vtpm.NewAEADSealer(bytes.Repeat([]byte{1}, 32), nil)
	if err != nil {
		t.Fatal(err)
	}
	k, _ := vtpm.NewVMKey(nil)
	w, err := sealForTransfer(s, req, TxVM{UUID: vm, Generation: 3}, k)
	if err != nil {
		t.Fatal(err)
	}
	b := transferBinding(req, vm, 3)
	b.Domain = vtpm.DomainAtRest
	if _, err := s.OpenKey(vtpm.Sealed{Nonce: w.Nonce, Ciphertext: w.Ciphertext}, b); err == nil {
		t.Fatal("a transfer-sealed key opened in the at-rest domain")
	}
	w2 := w
	w2.UUID = "0e2e0e2e-0000-4000-8000-000000000002"
	if _, err := openFromTransfer(s, req, w2); err == nil {
		t.Fatal("a key sealed for one VM opened for another")
	}
	back, err := openFromTransfer(s, req, w)
	if err != nil || !back.Equal(k) {
		t.Fatalf("round trip: %v", err)
	}
}
