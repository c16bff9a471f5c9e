package migrate

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"io"
	"strconv"

	"github.com/vtpmm/vtpmm/vtpm"
)

// transferAD is the AEAD associated data of one VM key in a batch: it binds
// the key to the transaction, VM, generation, both hosts and the evidence
// the source verified. Fields are length-prefixed.
func transferAD(txID, vm string, gen uint64, src, dst string, evidenceDigest []byte) []byte {
	var b bytes.Buffer
	b.WriteString("vtpmm/transfer/v" + strconv.Itoa(ProtocolVersion))
	for _, f := range [][]byte{[]byte(txID), []byte(vm), []byte(src), []byte(dst), evidenceDigest} {
		_ = binary.Write(&b, binary.BigEndian, uint16(len(f)))
		b.Write(f)
	}
	_ = binary.Write(&b, binary.BigEndian, gen)
	return b.Bytes()
}

func transferAEAD(tk []byte) (cipher.AEAD, error) {
	if len(tk) != 32 {
		return nil, fmt.Errorf("%w: transfer key of %d bytes", ErrBadMessage, len(tk))
	}
	block, err := aes.NewCipher(tk)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

// sealForTransfer puts one VM key under the transfer key.
func sealForTransfer(aead cipher.AEAD, rnd io.Reader, req *PrepareRequest, vm TxVM, k vtpm.VMKey) (WrappedVM, error) {
	nonce := make([]byte, aead.NonceSize())
	if _, err := io.ReadFull(rnd, nonce); err != nil {
		return WrappedVM{}, err
	}
	ct, err := k.SealWith(aead, nonce, transferAD(req.TxID, vm.UUID, vm.Generation, req.Source, req.Dest, req.EvidenceDigest))
	if err != nil {
		return WrappedVM{}, err
	}
	return WrappedVM{UUID: vm.UUID, Name: vm.Name, Generation: vm.Generation, Nonce: nonce, Ciphertext: ct}, nil
}

// openFromTransfer opens one VM key of a batch on the destination.
func openFromTransfer(aead cipher.AEAD, req *PrepareRequest, w WrappedVM) (vtpm.VMKey, error) {
	return vtpm.OpenVMKeyWith(aead, w.Nonce, w.Ciphertext,
		transferAD(req.TxID, w.UUID, w.Generation, req.Source, req.Dest, req.EvidenceDigest))
}

func digest(b []byte) []byte {
	h := sha256.Sum256(b)
	return h[:]
}

func wipe(b []byte) {
	for i := range b {
		b[i] = 0
	}
}
