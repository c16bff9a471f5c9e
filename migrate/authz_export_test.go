package migrate

import (
	"io"

	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/identity"
)

// ForgePrepare builds a Prepare as any holder of VM keys can: the transfer
// key wrapped for mkPublic, each key sealed under it with the request's
// bindings. Attack tests use it to send what a rogue source would.
func ForgePrepare(rnd io.Reader, mkPublic []byte, req *PrepareRequest, vms []TxVM, keys map[string]vtpm.VMKey) error {
	tk := make([]byte, 32)
	defer wipe(tk)
	if _, err := io.ReadFull(rnd, tk); err != nil {
		return err
	}
	wk, err := identity.Wrap(rnd, mkPublic, tk)
	if err != nil {
		return err
	}
	req.TransferKey = *wk
	s, err := transferSealer(tk, rnd)
	if err != nil {
		return err
	}
	req.VMs = nil
	for _, vm := range vms {
		w, err := sealForTransfer(s, req, vm, keys[vm.UUID])
		if err != nil {
			return err
		}
		req.VMs = append(req.VMs, w)
	}
	return nil
}
