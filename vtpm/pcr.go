package vtpm

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// PCRSelection names a set of PCRs in one bank. vtpmm seals to SHA-256 PCRs.
type PCRSelection struct {
	PCRs []int // sorted, unique, 0..23
}

// DefaultPCRs is the default vault PCR selection: firmware code (0),
// option ROMs (2), boot loader and kernel (4) and Secure Boot state (7).
// See docs/vault.md for the trade-off against PCR 7 alone.
var DefaultPCRs = PCRSelection{PCRs: []int{0, 2, 4, 7}}

// ParsePCRSelection parses "0,2,4,7" (an optional "sha256:" prefix is accepted).
func ParsePCRSelection(s string) (PCRSelection, error) {
	s = strings.TrimPrefix(strings.TrimSpace(s), "sha256:")
	if s == "" {
		return PCRSelection{}, fmt.Errorf("parse PCR selection: empty (name at least one PCR, e.g. 7)")
	}
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 0 || n > 23 {
			return PCRSelection{}, fmt.Errorf("parse PCR selection %q: %q is not a PCR index 0..23", s, f)
		}
		out = append(out, n)
	}
	slices.Sort(out)
	return PCRSelection{PCRs: slices.Compact(out)}, nil
}

func (p PCRSelection) String() string {
	parts := make([]string, len(p.PCRs))
	for i, n := range p.PCRs {
		parts[i] = strconv.Itoa(n)
	}
	return "sha256:" + strings.Join(parts, ",")
}

func (p PCRSelection) tpml() tpm2.TPMLPCRSelection {
	return tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{{
		Hash:      tpm2.TPMAlgSHA256,
		PCRSelect: tpm2.PCClientCompatible.PCRs(toUint(p.PCRs)...),
	}}}
}

func toUint(in []int) []uint {
	out := make([]uint, len(in))
	for i, v := range in {
		out[i] = uint(v)
	}
	return out
}

// PCRValues maps a PCR index to its SHA-256 value.
type PCRValues map[int][]byte

// digest is the TPM's pcrDigest over the selection: SHA-256 of the values
// concatenated in ascending PCR order.
func (v PCRValues) digest(sel PCRSelection) ([]byte, error) {
	h := sha256.New()
	for _, i := range sel.PCRs {
		d, ok := v[i]
		if !ok {
			return nil, fmt.Errorf("PCR %d: no value", i)
		}
		h.Write(d)
	}
	return h.Sum(nil), nil
}

// hexMap renders the values for storage in the vault file.
func (v PCRValues) hexMap() map[string]string {
	out := make(map[string]string, len(v))
	for i, d := range v {
		out[strconv.Itoa(i)] = hex.EncodeToString(d)
	}
	return out
}

func pcrValuesFromHex(m map[string]string) (PCRValues, error) {
	out := make(PCRValues, len(m))
	for k, s := range m {
		i, err := strconv.Atoi(k)
		if err != nil || i < 0 || i > 23 {
			return nil, fmt.Errorf("PCR index %q", k)
		}
		d, err := hex.DecodeString(s)
		if err != nil || len(d) != sha256.Size {
			return nil, fmt.Errorf("PCR %d value %q is not a SHA-256 digest", i, s)
		}
		out[i] = d
	}
	return out, nil
}

// ReadPCRs reads the selected SHA-256 PCRs. A TPM returns at most eight
// PCRs per PCR_Read, so larger selections take more than one command.
func ReadPCRs(tpm transport.TPM, sel PCRSelection) (PCRValues, error) {
	out := PCRValues{}
	remaining := slices.Clone(sel.PCRs)
	for len(remaining) > 0 {
		rsp, err := tpm2.PCRRead{PCRSelectionIn: PCRSelection{PCRs: remaining}.tpml()}.Execute(tpm)
		if err != nil {
			return nil, tpmError("read PCRs", err)
		}
		var got []int
		for _, s := range rsp.PCRSelectionOut.PCRSelections {
			if s.Hash != tpm2.TPMAlgSHA256 {
				continue
			}
			for byteIdx, b := range s.PCRSelect {
				for bit := 0; bit < 8; bit++ {
					if b&(1<<bit) != 0 {
						got = append(got, byteIdx*8+bit)
					}
				}
			}
		}
		if len(got) == 0 || len(got) != len(rsp.PCRValues.Digests) {
			return nil, fmt.Errorf("read PCRs %v: %w: the TPM returned %d values for %d PCRs (is the SHA-256 bank active?)",
				remaining, ErrTPMResponse, len(rsp.PCRValues.Digests), len(got))
		}
		for i, idx := range got {
			out[idx] = rsp.PCRValues.Digests[i].Buffer
		}
		remaining = slices.DeleteFunc(remaining, func(i int) bool { _, ok := out[i]; return ok })
	}
	return out, nil
}

// pcrPolicyDigest computes, in software, the policy digest of
// PolicyPCR(sel, values): sealing to predicted values needs no TPM.
func pcrPolicyDigest(sel PCRSelection, values PCRValues) ([]byte, error) {
	d, err := values.digest(sel)
	if err != nil {
		return nil, err
	}
	calc, err := tpm2.NewPolicyCalculator(tpm2.TPMAlgSHA256)
	if err != nil {
		return nil, err
	}
	if err := (tpm2.PolicyPCR{PcrDigest: tpm2.TPM2BDigest{Buffer: d}, Pcrs: sel.tpml()}).Update(calc); err != nil {
		return nil, err
	}
	return calc.Hash().Digest, nil
}
