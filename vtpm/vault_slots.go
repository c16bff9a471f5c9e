package vtpm

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

const (
	slotPCR      = "pcr"
	slotRecovery = "recovery"
)

// slotFile is one sealed copy of the vault key: a TPM keyed-hash object
// under the SRK, released either by a PCR policy or by the recovery key.
type slotFile struct {
	Kind         string            `json:"kind"`
	Label        string            `json:"label"`
	PCRs         []int             `json:"pcrs,omitempty"`
	PCRValues    map[string]string `json:"pcr_values,omitempty"`
	PolicyDigest string            `json:"policy_digest,omitempty"`
	Public       []byte            `json:"public"`  // TPM2B_PUBLIC
	Private      []byte            `json:"private"` // TPM2B_PRIVATE (encrypted by the TPM)
	// Auth names the recovery slot's authValue derivation: authHexV2, or
	// empty for slots made before it (authValue v1).
	Auth    string    `json:"auth,omitempty"`
	Created time.Time `json:"created"`
}

func (s slotFile) describe() string {
	if s.Kind == slotRecovery {
		return "recovery key"
	}
	return fmt.Sprintf("%s: %s", s.Label, PCRSelection{PCRs: s.PCRs})
}

func (s slotFile) pcrs() (PCRSelection, PCRValues, error) {
	vals, err := pcrValuesFromHex(s.PCRValues)
	if err != nil {
		return PCRSelection{}, nil, err
	}
	sel := PCRSelection{PCRs: s.PCRs}
	for _, i := range sel.PCRs {
		if _, ok := vals[i]; !ok {
			return PCRSelection{}, nil, fmt.Errorf("PCR %d has no sealed value", i)
		}
	}
	return sel, vals, nil
}

// PCRChange is one PCR whose current value differs from the sealed one.
type PCRChange struct {
	Index   int
	Sealed  []byte
	Current []byte
}

// SlotMismatch lists the changed PCRs for one sealed slot.
type SlotMismatch struct {
	Label   string
	Changed []PCRChange
}

// PCRMismatchError says which PCRs changed since the vault was sealed, and
// how to recover. It unwraps to ErrPCRMismatch.
type PCRMismatchError struct {
	Slots []SlotMismatch
}

func (e *PCRMismatchError) Unwrap() error { return ErrPCRMismatch }

// ChangedPCRs returns the changed PCR indexes of the first (newest) slot.
func (e *PCRMismatchError) ChangedPCRs() []int {
	if len(e.Slots) == 0 {
		return nil
	}
	out := make([]int, 0, len(e.Slots[0].Changed))
	for _, c := range e.Slots[0].Changed {
		out = append(out, c.Index)
	}
	return out
}

func (e *PCRMismatchError) Error() string {
	var b strings.Builder
	b.WriteString("PCR policy mismatch: the host booted into a state the vault was not sealed for")
	for _, s := range e.Slots {
		fmt.Fprintf(&b, "; sealed %q:", s.Label)
		for i, c := range s.Changed {
			if i > 0 {
				b.WriteString(",")
			}
			fmt.Fprintf(&b, " PCR %d changed (sealed %s…, now %s…)", c.Index, short(c.Sealed), short(c.Current))
		}
	}
	b.WriteString(". To recover: if the change is unexpected, treat the host as compromised and do not reseal." +
		" If it was a planned firmware or OS update, either boot the previous state and run 'vtpmd vault reseal'" +
		" (with --predict for the update's PCR values) before updating again, or run 'vtpmd vault recover'" +
		" with the recovery key, which reseals to the current boot state")
	return b.String()
}

func short(b []byte) string {
	s := hex.EncodeToString(b)
	if len(s) > 12 {
		return s[:12]
	}
	return s
}

func diffPCRs(sel PCRSelection, want, have PCRValues) []PCRChange {
	var out []PCRChange
	for _, i := range sel.PCRs {
		if string(want[i]) != string(have[i]) {
			out = append(out, PCRChange{Index: i, Sealed: want[i], Current: have[i]})
		}
	}
	return out
}

// encSession is a one-shot HMAC session salted to the SRK that encrypts the
// first command parameter (dir In) or response parameter (dir Out), so the
// vault key never crosses the TPM bus in the clear.
func encSession(srk srkInfo, dir tpm2.TPMAlgID, auth []byte) tpm2.Session {
	d := tpm2.EncryptIn
	if dir == tpm2.TPMAlgNull {
		d = tpm2.EncryptOut
	}
	return tpm2.HMAC(tpm2.TPMAlgSHA256, 16, tpm2.Salted(srk.Handle, srk.Public), tpm2.AESEncryption(128, d), tpm2.Auth(auth))
}

func sealedTemplate(policy []byte, userWithAuth bool) tpm2.TPMTPublic {
	return tpm2.TPMTPublic{
		Type:    tpm2.TPMAlgKeyedHash,
		NameAlg: tpm2.TPMAlgSHA256,
		ObjectAttributes: tpm2.TPMAObject{
			FixedTPM:     true,
			FixedParent:  true,
			UserWithAuth: userWithAuth,
		},
		AuthPolicy: tpm2.TPM2BDigest{Buffer: policy},
		Parameters: tpm2.NewTPMUPublicParms(tpm2.TPMAlgKeyedHash,
			&tpm2.TPMSKeyedHashParms{Scheme: tpm2.TPMTKeyedHashScheme{Scheme: tpm2.TPMAlgNull}}),
	}
}

func createSealed(tpm transport.TPM, srk srkInfo, tmpl tpm2.TPMTPublic, key *secret32, userAuth []byte) (pub, priv []byte, err error) {
	rsp, err := tpm2.Create{
		ParentHandle: tpm2.AuthHandle{Handle: srk.Handle, Name: srk.Name, Auth: encSession(srk, tpm2.TPMAlgAES, nil)},
		InSensitive: tpm2.TPM2BSensitiveCreate{Sensitive: &tpm2.TPMSSensitiveCreate{
			UserAuth: tpm2.TPM2BAuth{Buffer: userAuth},
			Data:     tpm2.NewTPMUSensitiveCreate(&tpm2.TPM2BSensitiveData{Buffer: key[:]}),
		}},
		InPublic: tpm2.New2B(tmpl),
	}.Execute(tpm)
	if err != nil {
		return nil, nil, tpmError("seal vault key", err)
	}
	return tpm2.Marshal(rsp.OutPublic), tpm2.Marshal(rsp.OutPrivate), nil
}

func sealPCRSlot(tpm transport.TPM, srk srkInfo, key *secret32, sel PCRSelection, values PCRValues, label string, now time.Time) (slotFile, error) {
	policy, err := pcrPolicyDigest(sel, values)
	if err != nil {
		return slotFile{}, fmt.Errorf("PCR policy: %w", err)
	}
	pub, priv, err := createSealed(tpm, srk, sealedTemplate(policy, false), key, nil)
	if err != nil {
		return slotFile{}, err
	}
	return slotFile{
		Kind: slotPCR, Label: label, PCRs: sel.PCRs, PCRValues: values.hexMap(),
		PolicyDigest: hex.EncodeToString(policy), Public: pub, Private: priv, Created: now.UTC(),
	}, nil
}

func sealRecoverySlot(tpm transport.TPM, srk srkInfo, key *secret32, rk *RecoveryKey, now time.Time) (slotFile, error) {
	pub, priv, err := createSealed(tpm, srk, sealedTemplate(nil, true), key, rk.authValue(authHexV2))
	if err != nil {
		return slotFile{}, err
	}
	return slotFile{Kind: slotRecovery, Label: "recovery key", Public: pub, Private: priv, Auth: authHexV2, Created: now.UTC()}, nil
}

// loadSlot loads a slot's sealed object under the SRK. The caller flushes it.
func loadSlot(tpm transport.TPM, srk srkInfo, s slotFile) (*tpm2.LoadResponse, error) {
	pub, err := tpm2.Unmarshal[tpm2.TPM2BPublic](s.Public)
	if err != nil {
		return nil, fmt.Errorf("%w: slot %q public area: %v", ErrCorrupt, s.Label, err)
	}
	priv, err := tpm2.Unmarshal[tpm2.TPM2BPrivate](s.Private)
	if err != nil {
		return nil, fmt.Errorf("%w: slot %q private area: %v", ErrCorrupt, s.Label, err)
	}
	rsp, err := tpm2.Load{
		ParentHandle: tpm2.AuthHandle{Handle: srk.Handle, Name: srk.Name, Auth: tpm2.PasswordAuth(nil)},
		InPrivate:    *priv,
		InPublic:     *pub,
	}.Execute(tpm)
	if err != nil {
		if errors.Is(err, tpm2.TPMRCIntegrity) || errors.Is(err, tpm2.TPMRCBinding) || errors.Is(err, tpm2.TPMRCSize) {
			return nil, fmt.Errorf("load slot %q: %w: the TPM rejected the sealed blob (%v)", s.Label, ErrCorrupt, err)
		}
		return nil, tpmError(fmt.Sprintf("load slot %q", s.Label), err)
	}
	return rsp, nil
}

func unsealPCRSlot(tpm transport.TPM, srk srkInfo, s slotFile, sel PCRSelection, values PCRValues) (*secret32, error) {
	obj, err := loadSlot(tpm, srk, s)
	if err != nil {
		return nil, err
	}
	defer flush(tpm, obj.ObjectHandle)
	digest, err := values.digest(sel)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrCorrupt, err)
	}
	sess := tpm2.Policy(tpm2.TPMAlgSHA256, 16, func(t transport.TPM, h tpm2.TPMISHPolicy, _ tpm2.TPM2BNonce) error {
		_, err := tpm2.PolicyPCR{PolicySession: h, PcrDigest: tpm2.TPM2BDigest{Buffer: digest}, Pcrs: sel.tpml()}.Execute(t)
		return err
	}, tpm2.Salted(srk.Handle, srk.Public), tpm2.AESEncryption(128, tpm2.EncryptOut))
	rsp, err := tpm2.Unseal{ItemHandle: tpm2.AuthHandle{Handle: obj.ObjectHandle, Name: obj.Name, Auth: sess}}.Execute(tpm)
	if err != nil {
		if errors.Is(err, tpm2.TPMRCValue) || errors.Is(err, tpm2.TPMRCPolicyFail) {
			// The PCRs changed between our read and the policy check.
			return nil, fmt.Errorf("unseal slot %q: %w: %v", s.Label, ErrPCRMismatch, err)
		}
		return nil, tpmError(fmt.Sprintf("unseal slot %q", s.Label), err)
	}
	return secretFromBytes(rsp.OutData.Buffer)
}

func unsealRecoverySlot(tpm transport.TPM, srk srkInfo, s slotFile, rk *RecoveryKey) (*secret32, error) {
	obj, err := loadSlot(tpm, srk, s)
	if err != nil {
		return nil, err
	}
	defer flush(tpm, obj.ObjectHandle)
	rsp, err := tpm2.Unseal{ItemHandle: tpm2.AuthHandle{
		Handle: obj.ObjectHandle, Name: obj.Name, Auth: encSession(srk, tpm2.TPMAlgNull, rk.authValue(s.Auth)),
	}}.Execute(tpm)
	if err != nil {
		if errors.Is(err, tpm2.TPMRCAuthFail) || errors.Is(err, tpm2.TPMRCBadAuth) {
			return nil, fmt.Errorf("unseal recovery slot: %w: %v", ErrRecoveryKey, err)
		}
		return nil, tpmError("unseal recovery slot", err)
	}
	return secretFromBytes(rsp.OutData.Buffer)
}

// authHexV2 is the recovery authValue derivation of new slots.
const authHexV2 = "hex-v2"

// recoveryAuthValue derives the TPM authValue of the recovery slot.
//
// authHexV2 (every slot made now): the hex digits of the first 16 bytes of
// SHA-256("vtpmm vault recovery v2\x00" || key): 32 ASCII bytes, 128 bits,
// and never a zero octet. Zero octets must be avoided: the TPM removes
// trailing zeros from an authValue (TPM 2.0 Part 1, "Trailing zeros are
// removed"), and go-tpm v0.9.8's HMAC session (hmacKeyFromAuthValue) cuts
// the value at its first zero octet wherever it is, so a value with any
// zero inside was refused with TPM_RC_AUTH_FAIL (1 key in 8).
//
// "" (slots made before): SHA-256("vtpmm vault recovery v1\x00" || key)
// with trailing zeros trimmed; kept so those slots still open, which they
// do unless the hash has a zero octet inside (re-create them with a new
// recovery key: vtpmd vault status shows the slots).
func recoveryAuthValue(k []byte, scheme string) []byte {
	if scheme == authHexV2 {
		h := sha256.Sum256(append([]byte("vtpmm vault recovery v2\x00"), k...))
		out := make([]byte, hex.EncodedLen(16))
		hex.Encode(out, h[:16])
		return out
	}
	h := sha256.Sum256(append([]byte("vtpmm vault recovery v1\x00"), k...))
	return bytes.TrimRight(h[:], "\x00")
}
