package guestseal

import (
	"fmt"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// The NV record: version (1), count (1), then per PCR its index (1) and its
// SHA-256 value at seal time (32).
func encodeMeta(pcrs []int, values [][]byte) []byte {
	b := []byte{metaVersion, byte(len(pcrs))}
	for i, p := range pcrs {
		b = append(b, byte(p))
		b = append(b, values[i]...)
	}
	return b
}

func decodeMeta(b []byte) ([]int, [][]byte, error) {
	if len(b) < 2 || b[0] != metaVersion || len(b) != 2+int(b[1])*33 {
		return nil, nil, fmt.Errorf("%w: unreadable NV record at %#x", ErrNotSealed, MetaIndex)
	}
	var pcrs []int
	var vals [][]byte
	for off := 2; off < len(b); off += 33 {
		pcrs = append(pcrs, int(b[off]))
		vals = append(vals, b[off+1:off+33])
	}
	return pcrs, vals, nil
}

func undefineMeta(tpm transport.TPM) error {
	pub, err := tpm2.NVReadPublic{NVIndex: MetaIndex}.Execute(tpm)
	if err != nil {
		if isRC(err, tpm2.TPMRCHandle) {
			return nil
		}
		return fmt.Errorf("NV_ReadPublic(%#x): %w", MetaIndex, err)
	}
	_, err = tpm2.NVUndefineSpace{AuthHandle: owner(), NVIndex: tpm2.NamedHandle{Handle: MetaIndex, Name: pub.NVName}}.Execute(tpm)
	if err != nil {
		return fmt.Errorf("NV_UndefineSpace(%#x): %w", MetaIndex, err)
	}
	return nil
}

func writeMeta(tpm transport.TPM, pcrs []int, values [][]byte) error {
	data := encodeMeta(pcrs, values)
	if err := undefineMeta(tpm); err != nil {
		return err
	}
	def := tpm2.TPMSNVPublic{
		NVIndex: MetaIndex, NameAlg: tpm2.TPMAlgSHA256,
		Attributes: tpm2.TPMANV{OwnerWrite: true, OwnerRead: true, AuthRead: true, AuthWrite: true, NoDA: true, NT: tpm2.TPMNTOrdinary},
		DataSize:   uint16(len(data)),
	}
	if _, err := (tpm2.NVDefineSpace{AuthHandle: owner(), PublicInfo: tpm2.New2B(def)}).Execute(tpm); err != nil {
		return fmt.Errorf("NV_DefineSpace(%#x): %w", MetaIndex, err)
	}
	pub, err := tpm2.NVReadPublic{NVIndex: MetaIndex}.Execute(tpm)
	if err != nil {
		return fmt.Errorf("NV_ReadPublic(%#x): %w", MetaIndex, err)
	}
	if _, err := (tpm2.NVWrite{
		AuthHandle: owner(), NVIndex: tpm2.NamedHandle{Handle: MetaIndex, Name: pub.NVName},
		Data: tpm2.TPM2BMaxNVBuffer{Buffer: data},
	}).Execute(tpm); err != nil {
		return fmt.Errorf("NV_Write(%#x): %w", MetaIndex, err)
	}
	return nil
}

func readMeta(tpm transport.TPM) ([]int, [][]byte, error) {
	pub, err := tpm2.NVReadPublic{NVIndex: MetaIndex}.Execute(tpm)
	if err != nil {
		if isRC(err, tpm2.TPMRCHandle) {
			return nil, nil, fmt.Errorf("%w (no NV record at %#x)", ErrNotSealed, MetaIndex)
		}
		return nil, nil, fmt.Errorf("NV_ReadPublic(%#x): %w", MetaIndex, err)
	}
	c, err := pub.NVPublic.Contents()
	if err != nil {
		return nil, nil, fmt.Errorf("NV_ReadPublic(%#x): %w", MetaIndex, err)
	}
	r, err := tpm2.NVRead{
		AuthHandle: owner(), NVIndex: tpm2.NamedHandle{Handle: MetaIndex, Name: pub.NVName}, Size: c.DataSize,
	}.Execute(tpm)
	if err != nil {
		return nil, nil, fmt.Errorf("NV_Read(%#x): %w", MetaIndex, err)
	}
	return decodeMeta(r.Data.Buffer)
}
