package escrow

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"regexp"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/vtpmm/vtpmm/vtpm"
)

// Version is the bundle format version this build writes and reads.
const Version = 1

// Size limits. A bundle is refused before anything is decrypted when any
// field exceeds them.
const (
	MaxHeader    = 1 << 20  // the JSON header
	MaxState     = 64 << 20 // the vTPM state blob (swtpm's is tens of KiB)
	MaxShareFile = 32 << 10 // one custodian's age-encrypted share
	maxVMName    = 256
)

// The bundle's binary frame. All integers are big-endian.
//
//	magic       8 bytes  "\x89VTPMMB\n"
//	version     2 bytes  Version
//	header len  4 bytes  H <= MaxHeader
//	header      H bytes  the Header in canonical JSON (what Seal wrote, byte for byte)
//	shares      n times: length (4 bytes, <= MaxShareFile) and the custodian's age file;
//	                     its SHA-256 is Header.Custodians[i].ShareSHA256
//	nonce      12 bytes  AES-256-GCM nonce
//	sealed key 48 bytes  the VM key under the bundle key (32 + 16-byte tag);
//	                     associated data: magic, version, header length and header
//	state len   8 bytes  S = Header.State.Size <= MaxState
//	state       S bytes  the vTPM state blob; its SHA-256 is Header.State.SHA256
const (
	magic         = "\x89VTPMMB\n"
	prefixSize    = len(magic) + 2 + 4
	nonceSize     = 12
	sealedKeySize = 32 + 16
	idBytes       = 16

	cipherAES256GCM = "aes-256-gcm"
	schemeShamir    = "shamir-gf256" // k >= 2
	schemeSingle    = "single"       // k = 1: every share is the bundle key

	sharePrefix = "vtpmm/escrow/share/v1\x00"
	shareSize   = len(sharePrefix) + idBytes + 1 + 32
)

// Header is a bundle's metadata. Inspect returns it unauthenticated; Open
// returns it only after the bundle key has authenticated every byte of it.
type Header struct {
	Version    int              `json:"v"`
	ID         string           `json:"id"`          // 16 random bytes, hex: binds shares to this bundle
	VM         VM               `json:"vm"`          // the VM whose key and state this is
	Generation uint64           `json:"gen"`         // the VM's generation when sealed
	Created    time.Time        `json:"created"`     // UTC
	SourceHost string           `json:"source_host"` // the host that sealed it
	VaultKeyID string           `json:"vault_kid"`   // the source's vault key ID (metadata only)
	Threshold  int              `json:"k"`
	N          int              `json:"n"`
	Scheme     string           `json:"scheme"` // shamir-gf256, or single when k = 1
	Cipher     string           `json:"cipher"` // aes-256-gcm
	State      StateInfo        `json:"state"`
	Custodians []CustodianShare `json:"custodians"`
}

// VM names the VM of a bundle.
type VM struct {
	UUID string `json:"uuid"`
	Name string `json:"name"`
}

// StateInfo binds the vTPM state blob: its size and SHA-256 (hex).
type StateInfo struct {
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"`
}

// CustodianShare is one custodian's entry: who, which keys (kind and
// fingerprint only), the share's x coordinate, and the SHA-256 (hex) of
// the custodian's age file, which follows the header in the frame. The
// digest puts every byte of every share under the header's
// authentication, and names the custodian whose share changed.
type CustodianShare struct {
	Name        string           `json:"name"`
	Recipients  []RecipientLabel `json:"recipients"`
	X           int              `json:"x"`
	ShareSize   int              `json:"share_size"`
	ShareSHA256 string           `json:"share_sha256"`
}

// RecipientLabel identifies one recipient of a share without its key.
type RecipientLabel struct {
	Kind        Kind   `json:"kind"`
	Fingerprint string `json:"fp"`
}

// decoded is a bundle that passed the structural check.
type decoded struct {
	hdr    Header
	ad     []byte   // magic .. header: the AEAD's associated data
	shares [][]byte // the custodians' age files, in header order
	nonce  []byte
	ct     []byte
	state  []byte
}

var (
	hostIDRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$`) // as migrate's wire messages
	// pluginNameRE: age's allowed plugin name characters, lowercase as the
	// plugin package returns them.
	pluginNameRE = regexp.MustCompile(`^[a-z0-9+._-]{1,64}$`)
	hex16RE      = regexp.MustCompile(`^[0-9a-f]{16}$`)
	hex32RE      = regexp.MustCompile(`^[0-9a-f]{32}$`)
	hex64RE      = regexp.MustCompile(`^[0-9a-f]{64}$`)
)

// encodeHeader returns the canonical JSON of h.
func encodeHeader(h *Header) ([]byte, error) {
	b, err := json.Marshal(h)
	if err != nil {
		return nil, fmt.Errorf("encode bundle header: %w", err)
	}
	if len(b) > MaxHeader {
		return nil, fmt.Errorf("encode bundle header: %w: %d bytes (limit %d)", ErrBadRequest, len(b), MaxHeader)
	}
	return b, nil
}

// framePrefix returns magic, version and the header length followed by the header.
func framePrefix(hdr []byte) []byte {
	b := make([]byte, 0, prefixSize+len(hdr))
	b = append(b, magic...)
	b = binary.BigEndian.AppendUint16(b, Version)
	b = binary.BigEndian.AppendUint32(b, uint32(len(hdr)))
	return append(b, hdr...)
}

// decodeBundle runs the structural check: frame, limits, strict and
// canonical JSON, every header field. Nothing is decrypted.
func decodeBundle(b []byte) (*decoded, error) {
	if len(b) < prefixSize || string(b[:len(magic)]) != magic {
		return nil, fmt.Errorf("%w: not a vtpmm escrow bundle (bad magic)", ErrMalformed)
	}
	if v := binary.BigEndian.Uint16(b[len(magic):]); v != Version {
		return nil, fmt.Errorf("%w: format version %d (this build reads %d)", ErrUnsupportedVersion, v, Version)
	}
	hlen := int(binary.BigEndian.Uint32(b[len(magic)+2:]))
	if hlen > MaxHeader {
		return nil, fmt.Errorf("%w: header of %d bytes (limit %d)", ErrMalformed, hlen, MaxHeader)
	}
	if len(b)-prefixSize < hlen {
		return nil, fmt.Errorf("%w: truncated header (%d bytes)", ErrMalformed, len(b))
	}
	d := &decoded{ad: b[:prefixSize+hlen]}
	if err := decodeHeader(b[prefixSize:prefixSize+hlen], &d.hdr); err != nil {
		return nil, err
	}
	off := prefixSize + hlen
	for _, c := range d.hdr.Custodians {
		if len(b)-off < 4 {
			return nil, fmt.Errorf("%w: truncated before the share of %s", ErrMalformed, c.Name)
		}
		n := int(binary.BigEndian.Uint32(b[off:]))
		off += 4
		if n != c.ShareSize || len(b)-off < n {
			return nil, fmt.Errorf("%w: share of %s: %d bytes framed, header says %d, %d left", ErrMalformed, c.Name, n, c.ShareSize, len(b)-off)
		}
		d.shares = append(d.shares, b[off:off+n])
		off += n
	}
	if len(b)-off < nonceSize+sealedKeySize+8 {
		return nil, fmt.Errorf("%w: truncated before the sealed key (%d bytes)", ErrMalformed, len(b))
	}
	d.nonce = b[off : off+nonceSize]
	d.ct = b[off+nonceSize : off+nonceSize+sealedKeySize]
	off += nonceSize + sealedKeySize
	slen := binary.BigEndian.Uint64(b[off:])
	off += 8
	if slen != uint64(d.hdr.State.Size) {
		return nil, fmt.Errorf("%w: state length %d, the header says %d", ErrMalformed, slen, d.hdr.State.Size)
	}
	if uint64(len(b)-off) != slen {
		return nil, fmt.Errorf("%w: state length %d, %d bytes follow", ErrMalformed, slen, len(b)-off)
	}
	d.state = b[off:]
	return d, nil
}

// decodeHeader decodes strictly (no unknown fields, no trailing data),
// insists on the canonical encoding Seal writes (so a header that parses
// to the same values but differs in bytes is refused before unlock), and
// checks every field.
func decodeHeader(raw []byte, h *Header) error {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(h); err != nil {
		return fmt.Errorf("%w: header: %v", ErrMalformed, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return fmt.Errorf("%w: header: trailing data", ErrMalformed)
	}
	if h.Version != Version {
		return fmt.Errorf("%w: header version %d in a version %d frame", ErrMalformed, h.Version, Version)
	}
	if err := h.validate(); err != nil {
		return err
	}
	canon, err := json.Marshal(h)
	if err != nil || !bytes.Equal(canon, raw) {
		return fmt.Errorf("%w: header is not in canonical form (re-encoded, reordered or duplicated fields)", ErrMalformed)
	}
	return nil
}

func (h *Header) validate() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s", ErrMalformed, fmt.Sprintf(format, a...))
	}
	switch {
	case !hex32RE.MatchString(h.ID):
		return bad("bundle id %q", h.ID)
	case vtpm.CheckVMID(h.VM.UUID) != nil:
		return bad("VM UUID %q", h.VM.UUID)
	case !validText(h.VM.Name, maxVMName):
		return bad("VM name of %d bytes (1..%d printable UTF-8)", len(h.VM.Name), maxVMName)
	case h.Generation == 0:
		return bad("generation 0")
	case h.Created.IsZero() || h.Created.Location() != time.UTC:
		return bad("creation time %v (want UTC)", h.Created)
	case !hostIDRE.MatchString(h.SourceHost):
		return bad("source host %q", h.SourceHost)
	case h.VaultKeyID != "" && !hex16RE.MatchString(h.VaultKeyID):
		return bad("vault key id %q", h.VaultKeyID)
	case h.N != len(h.Custodians) || h.N < 1 || h.N > maxShares:
		return bad("n = %d with %d custodians (1..%d)", h.N, len(h.Custodians), maxShares)
	case h.Threshold < 1 || h.Threshold > h.N:
		return bad("threshold %d of %d", h.Threshold, h.N)
	case h.Threshold == 1 && h.Scheme != schemeSingle, h.Threshold > 1 && h.Scheme != schemeShamir:
		return bad("scheme %q for k = %d", h.Scheme, h.Threshold)
	case h.Cipher != cipherAES256GCM:
		return bad("cipher %q", h.Cipher)
	case h.State.Size < 0 || h.State.Size > MaxState || !hex64RE.MatchString(h.State.SHA256):
		return bad("state size %d or digest %q", h.State.Size, h.State.SHA256)
	}
	names := map[string]bool{}
	for i, c := range h.Custodians {
		switch {
		case !custodianNameRE.MatchString(c.Name) || names[c.Name]:
			return bad("custodian %d: name %q missing, malformed or repeated", i+1, c.Name)
		case c.X != i+1:
			return bad("custodian %s: x = %d, want %d", c.Name, c.X, i+1)
		case len(c.Recipients) == 0 || len(c.Recipients) > maxRecipientsPerCustodian:
			return bad("custodian %s: %d recipients (1..%d)", c.Name, len(c.Recipients), maxRecipientsPerCustodian)
		case !hex64RE.MatchString(c.ShareSHA256):
			return bad("custodian %s: share digest %q", c.Name, c.ShareSHA256)
		case c.ShareSize < 1 || c.ShareSize > MaxShareFile:
			return bad("custodian %s: share of %d bytes (1..%d)", c.Name, c.ShareSize, MaxShareFile)
		}
		names[c.Name] = true
		for _, r := range c.Recipients {
			if !validKind(r.Kind) || !hex16RE.MatchString(r.Fingerprint) {
				return bad("custodian %s: recipient label %q/%q", c.Name, r.Kind, r.Fingerprint)
			}
		}
	}
	return nil
}

func validKind(k Kind) bool {
	switch k {
	case KindX25519, KindHybrid, KindTag, KindTagPQ:
		return true
	}
	return pluginNameRE.MatchString(k.Plugin())
}

// validText: 1..max bytes of UTF-8 without control characters.
func validText(s string, max int) bool {
	if s == "" || len(s) > max || !utf8.ValidString(s) {
		return false
	}
	return strings.IndexFunc(s, unicode.IsControl) < 0
}

// Inspect runs the structural check and returns the header without
// opening anything: for listing bundles and for asking the operator which
// custodians are needed. Nothing in it is authenticated yet; Open
// authenticates it.
func Inspect(bundle []byte) (*Header, error) {
	d, err := decodeBundle(bundle)
	if err != nil {
		return nil, fmt.Errorf("inspect bundle: %w", err)
	}
	return &d.hdr, nil
}

// sharePlaintext is what a custodian's age file holds: a prefix, the
// bundle ID, x and the share.
func sharePlaintext(id []byte, x byte, y []byte) []byte {
	b := make([]byte, 0, shareSize)
	b = append(b, sharePrefix...)
	b = append(b, id...)
	b = append(b, x)
	return append(b, y...)
}

// digestHex is the hex SHA-256 of b.
func digestHex(b []byte) string {
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}
