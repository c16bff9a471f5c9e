package vtpm

import (
	"bytes"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// DefaultAnchorIndex is the NV index of the rollback anchor: in the owner
// range (0x01000000-0x013FFFFF of the TCG handle registry), 0x76 being 'v'.
// Configurable (AnchorConfig.Index, vtpmd's anchor.nv_index) for TPMs where
// another program uses it.
const DefaultAnchorIndex tpm2.TPMHandle = 0x01307601

// ownerRangeFirst and ownerRangeLast bound the owner NV index range.
const (
	ownerRangeFirst tpm2.TPMHandle = 0x01000000
	ownerRangeLast  tpm2.TPMHandle = 0x013FFFFF
)

// anchorAttributes are the anchor index's attributes:
//   - TPM_NT_COUNTER: only NV_Increment writes it, so it only ever goes up;
//     a counter defined again starts at the highest value any counter of
//     this TPM ever had, so undefining and redefining it never goes back;
//   - AUTHWRITE and AUTHREAD: increment and read with the index's authValue
//     in a password session, one command each (no session to start or
//     flush); the authValue is derived from the vault key, so only the vtpmd
//     that holds this host's vault can increment it;
//   - OWNERREAD: an operator can read the counter with owner auth, for
//     diagnosis (it is not secret);
//   - NO_DA: the authValue has 128 bits of entropy, so dictionary-attack
//     protection adds nothing, and a failed authorisation through this index
//     (another vault's vtpmd, a stray tool) must not lock the TPM out (the
//     vault's recovery slot is DA-protected);
//   - not ORDERLY: an orderly counter may jump ahead after a power loss,
//     which would look like the data directory rolled back;
//   - no OWNERWRITE and no POLICYDELETE: the owner cannot increment it (a
//     denial of service), and can still undefine it when the host is
//     decommissioned.
var anchorAttributes = tpm2.TPMANV{
	AuthWrite: true,
	AuthRead:  true,
	OwnerRead: true,
	NoDA:      true,
	NT:        tpm2.TPMNTCounter,
}

// anchorPublic is the index's public area as NV_DefineSpace gets it.
func anchorPublic(idx tpm2.TPMHandle) tpm2.TPMSNVPublic {
	return tpm2.TPMSNVPublic{NVIndex: idx, NameAlg: tpm2.TPMAlgSHA256, Attributes: anchorAttributes, DataSize: 8}
}

// anchorName is the index's name once it was written (TPMA_NV_WRITTEN set),
// computed locally: NV_Read and NV_Increment need no NV_ReadPublic first.
func anchorName(idx tpm2.TPMHandle) (tpm2.TPM2BName, error) {
	p := anchorPublic(idx)
	p.Attributes.Written = true
	n, err := tpm2.NVName(&p)
	if err != nil {
		return tpm2.TPM2BName{}, err
	}
	return *n, nil
}

// anchorAuthValue derives the index's authValue from the vault key: the hex
// digits of 16 bytes of HKDF output, 128 bits that never hold a zero octet
// (the TPM drops trailing zeros of an authValue and go-tpm cuts at the
// first one; see docs/field-notes.md).
func anchorAuthValue(vaultKey *secret32) ([]byte, error) {
	k, err := hkdf.Key(sha256.New, vaultKey[:], nil, "vtpmm anchor auth v1", 16)
	if err != nil {
		return nil, err
	}
	defer wipe(k)
	out := make([]byte, hex.EncodedLen(len(k)))
	hex.Encode(out, k)
	return out, nil
}

func checkAnchorIndex(idx tpm2.TPMHandle) error {
	if idx < ownerRangeFirst || idx > ownerRangeLast {
		return fmt.Errorf("%w: anchor NV index 0x%08x is outside the owner range 0x%08x-0x%08x",
			ErrBadURI, uint32(idx), uint32(ownerRangeFirst), uint32(ownerRangeLast))
	}
	return nil
}

// nvAnchor runs the anchor's TPM commands.
type nvAnchor struct {
	tpm  transport.TPM
	idx  tpm2.TPMHandle
	name tpm2.TPM2BName
	auth []byte
}

func (n *nvAnchor) handle() tpm2.AuthHandle {
	return tpm2.AuthHandle{Handle: n.idx, Name: n.name, Auth: tpm2.PasswordAuth(n.auth)}
}

// read is one NV_Read in a password session.
func (n *nvAnchor) read() (uint64, error) {
	r, err := tpm2.NVRead{AuthHandle: n.handle(), NVIndex: tpm2.NamedHandle{Handle: n.idx, Name: n.name}, Size: 8}.Execute(n.tpm)
	if err != nil {
		return 0, n.mapErr("read", err)
	}
	if len(r.Data.Buffer) != 8 {
		return 0, fmt.Errorf("read anchor 0x%08x: %w: %d bytes", uint32(n.idx), ErrTPMResponse, len(r.Data.Buffer))
	}
	return binary.BigEndian.Uint64(r.Data.Buffer), nil
}

// increment is one NV_Increment in a password session.
func (n *nvAnchor) increment() error {
	_, err := tpm2.NVIncrement{AuthHandle: n.handle(), NVIndex: tpm2.NamedHandle{Handle: n.idx, Name: n.name}}.Execute(n.tpm)
	return n.mapErr("increment", err)
}

func (n *nvAnchor) mapErr(op string, err error) error {
	op = fmt.Sprintf("%s anchor NV index 0x%08x", op, uint32(n.idx))
	switch {
	case err == nil:
		return nil
	case errors.Is(err, tpm2.TPMRCHandle):
		return fmt.Errorf("%s: %w: the index is not defined (TPM cleared, or another TPM?): %w", op, ErrAnchorMissing, err)
	case errors.Is(err, tpm2.TPMRCBadAuth), errors.Is(err, tpm2.TPMRCAuthFail):
		return fmt.Errorf("%s: %w: its authValue is not this vault's (defined by another vault or another program): %w", op, ErrAnchorConflict, err)
	case errors.Is(err, tpm2.TPMRCAttributes), errors.Is(err, tpm2.TPMRCNVAuthorization):
		return fmt.Errorf("%s: %w: the index has other attributes: %w", op, ErrAnchorConflict, err)
	case errors.Is(err, tpm2.TPMRCNVRate):
		return fmt.Errorf("%s: %w: TPM NV write rate limit, retry later: %w", op, ErrTPMUnavailable, err)
	}
	return tpmError(op, err)
}

// readPublic returns the index's public area, or ok=false when no index is
// defined there.
func readAnchorPublic(tpm transport.TPM, idx tpm2.TPMHandle) (pub tpm2.TPMSNVPublic, name tpm2.TPM2BName, ok bool, err error) {
	r, err := tpm2.NVReadPublic{NVIndex: idx}.Execute(tpm)
	if errors.Is(err, tpm2.TPMRCHandle) {
		return tpm2.TPMSNVPublic{}, tpm2.TPM2BName{}, false, nil
	}
	if err != nil {
		return tpm2.TPMSNVPublic{}, tpm2.TPM2BName{}, false, tpmError(fmt.Sprintf("read public of NV index 0x%08x", uint32(idx)), err)
	}
	p, err := r.NVPublic.Contents()
	if err != nil {
		return tpm2.TPMSNVPublic{}, tpm2.TPM2BName{}, false, fmt.Errorf("read public of NV index 0x%08x: %w: %v", uint32(idx), ErrTPMResponse, err)
	}
	return *p, r.NVName, true, nil
}

// sameAnchorShape reports whether a defined index is an anchor as vtpmm
// defines it (ignoring TPMA_NV_WRITTEN), and describes the difference.
func sameAnchorShape(have tpm2.TPMSNVPublic, idx tpm2.TPMHandle) (bool, string) {
	want := anchorPublic(idx)
	h := have
	h.Attributes.Written = false
	hb := tpm2.Marshal(h)
	wb := tpm2.Marshal(want)
	if bytes.Equal(hb, wb) {
		return true, ""
	}
	policy := "no policy"
	if len(have.AuthPolicy.Buffer) > 0 {
		policy = fmt.Sprintf("policy %x", have.AuthPolicy.Buffer)
	}
	return false, fmt.Sprintf("defined with attributes %#08x, nameAlg %#04x, size %d, %s; vtpmm's anchor has attributes %#08x, nameAlg SHA-256, size 8, no policy",
		nvAttrBits(have.Attributes)&^nvWrittenBit, uint16(have.NameAlg), have.DataSize, policy, nvAttrBits(want.Attributes))
}

const nvWrittenBit = 1 << 29

func nvAttrBits(a tpm2.TPMANV) uint32 {
	b := tpm2.Marshal(a)
	if len(b) != 4 {
		return 0
	}
	return binary.BigEndian.Uint32(b)
}
