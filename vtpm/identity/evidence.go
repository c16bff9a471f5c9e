package identity

import (
	"bytes"
	"context"
	"crypto"
	"fmt"
	"slices"
	"sort"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmm/vtpmm/attest"
	"github.com/vtpmm/vtpmm/vtpm"
)

// DefaultQuotePCRs is what Produce quotes when ProduceOptions.PCRs is
// empty: SHA-256 PCRs 0-9 (firmware, boot loader, Secure Boot state).
var DefaultQuotePCRs = map[attest.Bank][]int{"sha256": {0, 1, 2, 3, 4, 5, 6, 7, 8, 9}}

// maxQuoteAttempts bounds the quote / PCR_Read retries when PCRs change in
// between (a PCR extended by the OS between the two commands).
const maxQuoteAttempts = 3

// ProduceOptions configures Produce.
type ProduceOptions struct {
	HostID string
	Nonce  []byte // the verifier's nonce, 16..32 bytes
	// PCRs to quote, bank → indexes (DefaultQuotePCRs when empty). Use
	// PCRsForPolicy to quote what a verifier policy checks.
	PCRs map[attest.Bank][]int
	// EventLog is the TCG event log (e.g.
	// /sys/kernel/security/tpm0/binary_bios_measurements), optional.
	EventLog []byte
	// EKIntermediates are DER certificates sent along to help the
	// verifier build the EK path (untrusted), optional.
	EKIntermediates [][]byte
	// AKIntermediates help the verifier build the path of the AK
	// certificate (Identity.AKCert), optional.
	AKIntermediates [][]byte
	// Identity, when set, is used as is (read once with LoadIdentity):
	// producing evidence then costs only Certify, Quote and PCR_Read.
	// When nil, Produce reads it (LoadIdentity with Load).
	Identity *Identity
	Load     LoadOptions
	Now      func() time.Time // required
}

// PCRsForPolicy returns the PCRs a verifier policy needs quoted: the quote
// selection and every PCR with golden values, per bank.
func PCRsForPolicy(p *attest.Policy) map[attest.Bank][]int {
	out := map[attest.Bank][]int{}
	add := func(b attest.Bank, i int) {
		if !slices.Contains(out[b], i) {
			out[b] = append(out[b], i)
		}
	}
	for _, i := range p.Quote.PCRs {
		add(p.Quote.Bank, i)
	}
	for b, m := range p.GoldenPCRs {
		for k := range m {
			var i int
			if _, err := fmt.Sscan(k, &i); err == nil {
				add(b, i)
			}
		}
	}
	for b := range out {
		sort.Ints(out[b])
	}
	return out
}

// Produce makes attestation evidence for the verifier's nonce: TPM2_Certify
// of the MK by the AK and TPM2_Quote by the AK over the selected PCRs, both
// with the nonce as qualifying data, the PCR values, the EK (certificate
// and public area), AK and MK public areas and the event log. It only uses
// persistent keys: no key is created. With a cached Identity it costs
// Certify + Quote + one PCR_Read per 8 PCRs.
func Produce(ctx context.Context, tpm transport.TPM, opts ProduceOptions) (*attest.Evidence, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if opts.Now == nil {
		return nil, fmt.Errorf("produce evidence: %w: Now is required", ErrBadOptions)
	}
	if len(opts.Nonce) < attest.MinNonceSize || len(opts.Nonce) > attest.MaxNonceSize {
		return nil, fmt.Errorf("produce evidence: %w: nonce of %d bytes, want %d..%d", ErrBadOptions, len(opts.Nonce), attest.MinNonceSize, attest.MaxNonceSize)
	}
	sel, err := quoteSelection(opts.PCRs)
	if err != nil {
		return nil, fmt.Errorf("produce evidence: %w", err)
	}
	id := opts.Identity
	if id == nil {
		if id, err = LoadIdentity(ctx, tpm, opts.Load); err != nil {
			return nil, fmt.Errorf("produce evidence: %w", err)
		}
	}
	cert, err := tpm2.Certify{
		ObjectHandle:   id.MK.auth(),
		SignHandle:     id.AK.auth(),
		QualifyingData: tpm2.TPM2BData{Buffer: opts.Nonce},
		InScheme:       tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull},
	}.Execute(tpm)
	if err != nil {
		return nil, tpmError("produce evidence: certify MK", err)
	}
	quote, vals, err := quotePCRs(ctx, tpm, id.AK, opts.Nonce, sel)
	if err != nil {
		return nil, fmt.Errorf("produce evidence: %w", err)
	}
	ev := &attest.Evidence{
		Format: attest.EvidenceFormat, Version: attest.EvidenceVersion,
		HostID: opts.HostID, Nonce: bytes.Clone(opts.Nonce),
		EKCert: id.EK.Cert, EKIntermediates: opts.EKIntermediates,
		EKPublic: id.EK.Public, AKPublic: id.AK.Public, MKPublic: id.MK.Public,
		MKCertifyInfo: cert.CertifyInfo.Bytes(), MKCertifySig: tpm2.Marshal(cert.Signature),
		Quotes:     []attest.QuoteBlob{quote},
		EventLog:   opts.EventLog,
		ProducedAt: opts.Now().UTC(),
	}
	if len(id.AKCert) > 0 {
		ev.AKCert, ev.AKIntermediates = id.AKCert, opts.AKIntermediates
		ev.Version = attest.EvidenceVersionAKCert
	}
	ev.SetPCRValues(vals)
	if err := ev.Validate(); err != nil {
		return nil, fmt.Errorf("produce evidence: %w", err)
	}
	return ev, nil
}

// bankSel is one bank's part of the quote selection.
type bankSel struct {
	bank attest.Bank
	alg  tpm2.TPMIAlgHash
	size int
	pcrs []int // sorted
}

func bankAlg(b attest.Bank) (tpm2.TPMIAlgHash, crypto.Hash, bool) {
	switch b {
	case "sha1":
		return tpm2.TPMAlgSHA1, crypto.SHA1, true
	case "sha256":
		return tpm2.TPMAlgSHA256, crypto.SHA256, true
	case "sha384":
		return tpm2.TPMAlgSHA384, crypto.SHA384, true
	case "sha512":
		return tpm2.TPMAlgSHA512, crypto.SHA512, true
	}
	return 0, 0, false
}

// quoteSelection orders the banks by TPM algorithm ID (the order the
// selection is sent in, and the order of the pcrDigest).
func quoteSelection(m map[attest.Bank][]int) ([]bankSel, error) {
	if len(m) == 0 {
		m = DefaultQuotePCRs
	}
	var out []bankSel
	for b, pcrs := range m {
		alg, h, ok := bankAlg(b)
		if !ok {
			return nil, fmt.Errorf("%w: unknown PCR bank %q", ErrBadOptions, b)
		}
		s := slices.Compact(slices.Sorted(slices.Values(pcrs)))
		if len(s) == 0 {
			continue
		}
		if s[0] < 0 || s[len(s)-1] > 23 {
			return nil, fmt.Errorf("%w: %s PCR index out of range 0..23", ErrBadOptions, b)
		}
		out = append(out, bankSel{bank: b, alg: alg, size: h.Size(), pcrs: s})
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%w: no PCRs to quote", ErrBadOptions)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].alg < out[j].alg })
	return out, nil
}

func tpml(sel []bankSel) tpm2.TPMLPCRSelection {
	var l tpm2.TPMLPCRSelection
	for _, s := range sel {
		u := make([]uint, len(s.pcrs))
		for i, p := range s.pcrs {
			u[i] = uint(p)
		}
		l.PCRSelections = append(l.PCRSelections, tpm2.TPMSPCRSelection{Hash: s.alg, PCRSelect: tpm2.PCClientCompatible.PCRs(u...)})
	}
	return l
}

// quotePCRs quotes sel, then reads the PCR values, and checks that they
// hash to the quote's pcrDigest; if a PCR changed in between it quotes
// again (up to maxQuoteAttempts).
func quotePCRs(ctx context.Context, tpm transport.TPM, ak Key, nonce []byte, sel []bankSel) (attest.QuoteBlob, attest.PCRValues, error) {
	akPub, err := ak.public()
	if err != nil {
		return attest.QuoteBlob{}, nil, err
	}
	sigHash, err := signHash(akPub)
	if err != nil {
		return attest.QuoteBlob{}, nil, err
	}
	for attempt := 1; ; attempt++ {
		if err := ctx.Err(); err != nil {
			return attest.QuoteBlob{}, nil, err
		}
		q, err := tpm2.Quote{
			SignHandle:     ak.auth(),
			QualifyingData: tpm2.TPM2BData{Buffer: nonce},
			InScheme:       tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgNull},
			PCRSelect:      tpml(sel),
		}.Execute(tpm)
		if err != nil {
			return attest.QuoteBlob{}, nil, tpmError("quote", err)
		}
		vals, err := readPCRs(tpm, sel)
		if err != nil {
			return attest.QuoteBlob{}, nil, err
		}
		att, err := q.Quoted.Contents()
		if err != nil {
			return attest.QuoteBlob{}, nil, fmt.Errorf("quote: %w: %v", vtpm.ErrTPMResponse, err)
		}
		info, err := att.Attested.Quote()
		if err != nil {
			return attest.QuoteBlob{}, nil, fmt.Errorf("quote: %w: %v", vtpm.ErrTPMResponse, err)
		}
		h := sigHash.New()
		for _, s := range sel {
			for _, i := range s.pcrs {
				h.Write(vals[s.bank][i])
			}
		}
		if bytes.Equal(h.Sum(nil), info.PCRDigest.Buffer) {
			return attest.QuoteBlob{Attest: q.Quoted.Bytes(), Signature: tpm2.Marshal(q.Signature)}, vals, nil
		}
		if attempt == maxQuoteAttempts {
			return attest.QuoteBlob{}, nil, fmt.Errorf("quote: %w: the PCR values read after %d quotes never matched the quoted digest", ErrPCRsChanged, attempt)
		}
	}
}

// signHash is the AK's signing scheme hash, which the TPM also uses for
// the quote's pcrDigest.
func signHash(p *tpm2.TPMTPublic) (crypto.Hash, error) {
	e, err := p.Parameters.ECCDetail()
	if err != nil {
		return 0, fmt.Errorf("AK: %w: not an ECC key", ErrHandleInUse)
	}
	d, err := e.Scheme.Details.ECDSA()
	if err != nil {
		return 0, fmt.Errorf("AK: %w: no ECDSA scheme", ErrHandleInUse)
	}
	return d.HashAlg.Hash()
}

// readPCRs reads every selected PCR of every bank. A TPM returns at most 8
// digests per PCR_Read, so it asks again for what is still missing.
func readPCRs(tpm transport.TPM, sel []bankSel) (attest.PCRValues, error) {
	out := attest.PCRValues{}
	for _, s := range sel {
		out[s.bank] = map[int][]byte{}
	}
	for {
		var remaining []bankSel
		for _, s := range sel {
			var miss []int
			for _, i := range s.pcrs {
				if _, ok := out[s.bank][i]; !ok {
					miss = append(miss, i)
				}
			}
			if len(miss) > 0 {
				r := s
				r.pcrs = miss
				remaining = append(remaining, r)
			}
		}
		if len(remaining) == 0 {
			return out, nil
		}
		rsp, err := tpm2.PCRRead{PCRSelectionIn: tpml(remaining)}.Execute(tpm)
		if err != nil {
			return nil, tpmError("read PCRs", err)
		}
		n, k := 0, 0
		for _, s := range rsp.PCRSelectionOut.PCRSelections {
			bs := findBank(remaining, s.Hash)
			for byteIdx, b := range s.PCRSelect {
				for bit := 0; bit < 8; bit++ {
					if b&(1<<bit) == 0 {
						continue
					}
					if k >= len(rsp.PCRValues.Digests) || bs == nil || len(rsp.PCRValues.Digests[k].Buffer) != bs.size {
						return nil, fmt.Errorf("read PCRs: %w: PCR_Read returned an inconsistent selection", vtpm.ErrTPMResponse)
					}
					out[bs.bank][byteIdx*8+bit] = rsp.PCRValues.Digests[k].Buffer
					k++
					n++
				}
			}
		}
		if n == 0 {
			return nil, fmt.Errorf("read PCRs: %w: the TPM returned no values for %v (is the bank allocated?)", vtpm.ErrTPMResponse, banks(remaining))
		}
	}
}

func findBank(sel []bankSel, alg tpm2.TPMIAlgHash) *bankSel {
	for i := range sel {
		if sel[i].alg == alg {
			return &sel[i]
		}
	}
	return nil
}

func banks(sel []bankSel) []attest.Bank {
	out := make([]attest.Bank, len(sel))
	for i, s := range sel {
		out[i] = s.bank
	}
	return out
}
