package migrate

import (
	"crypto/sha256"
	"fmt"
	"io"
	"strconv"

	"github.com/vtpmm/vtpmm/vtpm"
)

// transferDomain is the domain of the transfer envelope's bindings.
func transferDomain() vtpm.Domain {
	return vtpm.Domain("vtpmm/transfer/v" + strconv.Itoa(ProtocolVersion))
}

// transferBinding binds one VM key of a batch to the transaction, VM,
// generation, both hosts and the evidence the source verified.
func transferBinding(req *PrepareRequest, vm string, gen uint64) vtpm.Binding {
	return vtpm.Binding{Domain: transferDomain(), Generation: gen,
		Fields: [][]byte{[]byte(req.TxID), []byte(vm), []byte(req.Source), []byte(req.Dest), req.EvidenceDigest}}
}

// transferSealer is the batch's Sealer under the transfer key.
func transferSealer(tk []byte, rnd io.Reader) (vtpm.Sealer, error) {
	s, err := vtpm.NewAEADSealer(tk, rnd)
	if err != nil {
		return nil, fmt.Errorf("%w: transfer key: %w", ErrBadMessage, err)
	}
	return s, nil
}

// sealForTransfer puts one VM key under the transfer key.
func sealForTransfer(s vtpm.Sealer, req *PrepareRequest, vm TxVM, k vtpm.VMKey) (WrappedVM, error) {
	sk, err := s.SealKey(k, transferBinding(req, vm.UUID, vm.Generation))
	if err != nil {
		return WrappedVM{}, err
	}
	return WrappedVM{UUID: vm.UUID, Name: vm.Name, Generation: vm.Generation, Nonce: sk.Nonce, Ciphertext: sk.Ciphertext}, nil
}

// openFromTransfer opens one VM key of a batch on the destination.
func openFromTransfer(s vtpm.Sealer, req *PrepareRequest, w WrappedVM) (vtpm.VMKey, error) {
	return s.OpenKey(vtpm.Sealed{Nonce: w.Nonce, Ciphertext: w.Ciphertext}, transferBinding(req, w.UUID, w.Generation))
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
