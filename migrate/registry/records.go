package registry

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"time"
)

// Version is the version of every record format; it is also part of the
// default key prefix (/vtpmm/v1/). A record of another version is refused.
const Version = 1

// MaxGeneration bounds every generation. It is the largest integer a JSON
// number carries exactly everywhere (2^53-1), so that no tool reading the
// registry rounds a fencing token; a change that would pass it fails with
// ErrGenerationBounds (an attacker's 2^64-1 is refused, not wrapped).
const MaxGeneration uint64 = 1<<53 - 1

// Size limits of encoded records (decoders refuse larger input).
const (
	MaxRecordBytes = 16 << 10 // host, state, enrolment, VM, standby, liveness
	MaxPlanBytes   = 1 << 20  // an evacuation plan (about 5000 VMs)
	maxPlanItems   = 10000
)

// HostState is a host's state in the fleet.
type HostState string

// Host states. Only the operator changes them (SetState).
const (
	// StateActive: the host takes part in everything.
	StateActive HostState = "active"
	// StateDraining: no migration may start towards the host (Begin
	// refuses it); VMs may leave it. Set by an evacuation.
	StateDraining HostState = "draining"
	// StateFenced: the host never becomes the owner of any VM again (a
	// retired, dead or untrusted host).
	StateFenced HostState = "fenced"
)

func (s HostState) valid() bool {
	return s == StateActive || s == StateDraining || s == StateFenced
}

// Identity names a host's TPM keys: the TPM names (or SHA-256 digests of
// the public areas) of its EK, AK and migration key, in hex.
type Identity struct {
	EK string `json:"ek"`
	AK string `json:"ak"`
	MK string `json:"mk,omitempty"`
}

// Host is a host's own record (key hosts/NAME), written by the host itself
// (Register): its wire address and the TPM identity it reports. Trust
// decisions use the operator's Enrolment, not this self-description.
type Host struct {
	V        int      `json:"v"`
	Name     string   `json:"name"`
	Addr     string   `json:"addr"`
	Identity Identity `json:"identity"`
}

// stateRecord is a host's state (key state/NAME), written by the operator
// (Enroll creates it active; SetState changes it). Its encoding is
// canonical: CAS compares it byte for byte.
type stateRecord struct {
	V     int       `json:"v"`
	State HostState `json:"state"`
}

// Enrolment is the operator's record of a host it enrolled (key
// enrol/NAME), written once after the EK-chain and credential-activation
// checks: every host trusts it, so a fleet of N hosts needs N enrolments,
// not N^2.
type Enrolment struct {
	V        int       `json:"v"`
	Host     string    `json:"host"`
	Identity Identity  `json:"identity"`
	By       string    `json:"by,omitempty"` // who enrolled it (operator identity)
	At       time.Time `json:"at"`
	// Detail is free text for operators (the EK certificate's issuer, ...).
	Detail string `json:"detail,omitempty"`
	// Method is how the operator's check proved the AK lives in the
	// host's TPM: "activation" (credential activation against the EK; ""
	// means the same) or "ak-certificate" (an AK certificate, whose
	// SHA-256 is AKCert).
	Method string `json:"method,omitempty"`
	AKCert string `json:"ak_cert,omitempty"`
	// Replaced are the TPM identities the host was enrolled with before
	// this one, oldest first: Reenroll appends the identity it replaces,
	// so that none of them is ever trusted again (rule identity-retired).
	// Empty for a first enrolment.
	Replaced []ReplacedIdentity `json:"replaced,omitempty"`
}

// ReplacedIdentity is a TPM identity a host was enrolled with before a
// re-enrolment replaced it (its TPM died, was stolen or was replaced with
// the motherboard).
type ReplacedIdentity struct {
	Identity Identity  `json:"identity"`
	At       time.Time `json:"at"`           // when it was enrolled
	Replaced time.Time `json:"replaced_at"`  // when Reenroll replaced it
	By       string    `json:"by,omitempty"` // who replaced it
}

// MaxReplaced bounds Enrolment.Replaced: a host's TPM replaced more often
// than this is refused re-enrolment (enrol it under a new name).
const MaxReplaced = 32

// Enrolment methods (Enrolment.Method), as package attest names them.
const (
	MethodActivation    = "activation"
	MethodAKCertificate = "ak-certificate"
)

// liveRecord is the value of live/NAME, attached to the host's lease.
type liveRecord struct {
	V     int       `json:"v"`
	Host  string    `json:"host"`
	Since time.Time `json:"since"`
}

// OpenTx is the migration a VM's record shows as open (between Begin and
// Commit or Abort).
type OpenTx struct {
	ID string `json:"id"`
	To string `json:"to"`
}

// VM is a VM's ownership record (key vms/ID): its owner, the generation
// (the fencing token) and the open migration, if any. The encoding is
// canonical (no timestamps, fixed field order) because every change
// compares it byte for byte.
type VM struct {
	V          int     `json:"v"`
	ID         string  `json:"vm"`
	Owner      string  `json:"owner"`
	Generation uint64  `json:"generation"`
	Tx         *OpenTx `json:"tx,omitempty"`
}

// Standby is one standby replica of a VM (key standby/VM/HOST): the host
// holds the VM key and a copy of its state at Generation and cannot start
// from it until a takeover (TakeOver) makes it the owner. Generation 0:
// the host is assigned as a standby and holds no replica yet.
type Standby struct {
	V          int       `json:"v"`
	VM         string    `json:"vm"`
	Host       string    `json:"host"`
	Generation uint64    `json:"generation"`
	Updated    time.Time `json:"updated"`
}

// Plan is the evacuation plan of a source host and its progress (key
// evac/SOURCE). Writers compare its revision (PutPlan), so two runs of the
// same evacuation never move a VM twice.
type Plan struct {
	V       int        `json:"v"`
	Source  string     `json:"source"`
	State   string     `json:"state"` // free-form phase: planned, running, done, ...
	Items   []PlanItem `json:"items"`
	Created time.Time  `json:"created"`
	Updated time.Time  `json:"updated"`
}

// PlanItem is one VM of an evacuation plan.
type PlanItem struct {
	VM         string `json:"vm"`
	Dest       string `json:"dest,omitempty"`
	State      string `json:"state"` // planned, moving, moved, refused, failed, ...
	Generation uint64 `json:"generation,omitempty"`
	Detail     string `json:"detail,omitempty"`
}

// ---- validation ----

// validHost accepts DNS host names (the same rule as the fleet PKI: the
// name is the certificate's CN, and so etcd's user name).
func validHost(h string) error {
	if h == "" || len(h) > 253 {
		return fmt.Errorf("host name %q: %w", h, ErrBadRecord)
	}
	for _, label := range strings.Split(h, ".") {
		if len(label) == 0 || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return fmt.Errorf("host name %q: %w", h, ErrBadRecord)
		}
		for _, r := range label {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-') {
				return fmt.Errorf("host name %q: %w", h, ErrBadRecord)
			}
		}
	}
	return nil
}

// validID accepts VM and transaction IDs: 1 to 128 letters, digits, '-',
// '_' and '.', not starting with '.' (UUIDs, hex transaction IDs, names).
func validID(what, id string) error {
	if id == "" || len(id) > 128 || id[0] == '.' {
		return fmt.Errorf("%s %q: %w", what, id, ErrBadRecord)
	}
	for _, r := range id {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.') {
			return fmt.Errorf("%s %q: %w", what, id, ErrBadRecord)
		}
	}
	return nil
}

func validHex(what, s string, required bool) error {
	if s == "" && !required {
		return nil
	}
	if s == "" || len(s) > 132 || len(s)%2 != 0 {
		return fmt.Errorf("%s %q: %w: want 2 to 132 hex digits", what, s, ErrBadRecord)
	}
	for _, r := range s {
		if !(r >= '0' && r <= '9' || r >= 'a' && r <= 'f') {
			return fmt.Errorf("%s: %w: not lower-case hex", what, ErrBadRecord)
		}
	}
	return nil
}

func validText(what, s string, max int) error {
	if len(s) > max {
		return fmt.Errorf("%s: %w: longer than %d bytes", what, ErrBadRecord, max)
	}
	return nil
}

func (id Identity) validate() error {
	if err := validHex("EK", id.EK, true); err != nil {
		return err
	}
	if err := validHex("AK", id.AK, true); err != nil {
		return err
	}
	return validHex("MK", id.MK, false)
}

func checkVersion(v int) error {
	if v != Version {
		return fmt.Errorf("%w: record version %d, want %d", ErrBadRecord, v, Version)
	}
	return nil
}

func (h *Host) validate() error {
	if err := checkVersion(h.V); err != nil {
		return err
	}
	if err := validHost(h.Name); err != nil {
		return err
	}
	if h.Addr == "" {
		return fmt.Errorf("host %s: %w: empty address", h.Name, ErrBadRecord)
	}
	if err := validText("address", h.Addr, 260); err != nil {
		return err
	}
	return h.Identity.validate()
}

func (s *stateRecord) validate() error {
	if err := checkVersion(s.V); err != nil {
		return err
	}
	if !s.State.valid() {
		return fmt.Errorf("%w: host state %q", ErrBadRecord, s.State)
	}
	return nil
}

func (e *Enrolment) validate() error {
	if err := checkVersion(e.V); err != nil {
		return err
	}
	if err := validHost(e.Host); err != nil {
		return err
	}
	if e.By != "" {
		if err := validHost(e.By); err != nil {
			return err
		}
	}
	if err := validText("detail", e.Detail, 1024); err != nil {
		return err
	}
	switch e.Method {
	case "", MethodActivation:
		if e.AKCert != "" {
			return fmt.Errorf("enrolment of %s: %w: an AK certificate digest without method %s", e.Host, ErrBadRecord, MethodAKCertificate)
		}
	case MethodAKCertificate:
		if err := validHex("AK certificate digest", e.AKCert, true); err != nil {
			return err
		}
	default:
		return fmt.Errorf("enrolment of %s: %w: method %q", e.Host, ErrBadRecord, e.Method)
	}
	if err := e.Identity.validate(); err != nil {
		return err
	}
	if len(e.Replaced) > MaxReplaced {
		return fmt.Errorf("enrolment of %s: %w: %d replaced identities, at most %d", e.Host, ErrBadRecord, len(e.Replaced), MaxReplaced)
	}
	for i, r := range e.Replaced {
		if err := r.Identity.validate(); err != nil {
			return err
		}
		if r.Replaced.IsZero() {
			return fmt.Errorf("enrolment of %s: %w: replaced identity %d has no replaced_at", e.Host, ErrBadRecord, i)
		}
		if r.By != "" {
			if err := validHost(r.By); err != nil {
				return err
			}
		}
		if r.Identity.EK == e.Identity.EK || r.Identity.AK == e.Identity.AK {
			return fmt.Errorf("enrolment of %s: %w: the enrolled identity is also listed as replaced", e.Host, ErrBadRecord)
		}
	}
	return nil
}

func (l *liveRecord) validate() error {
	if err := checkVersion(l.V); err != nil {
		return err
	}
	return validHost(l.Host)
}

func validGeneration(g uint64) error {
	if g == 0 || g > MaxGeneration {
		return fmt.Errorf("generation %d: %w (1..%d)", g, ErrGenerationBounds, MaxGeneration)
	}
	return nil
}

func (v *VM) validate() error {
	if err := checkVersion(v.V); err != nil {
		return err
	}
	if err := validID("VM", v.ID); err != nil {
		return err
	}
	if err := validHost(v.Owner); err != nil {
		return err
	}
	if v.Generation == 0 || v.Generation > MaxGeneration {
		return fmt.Errorf("VM %s: %w: generation %d out of 1..%d", v.ID, ErrBadRecord, v.Generation, MaxGeneration)
	}
	if v.Tx != nil {
		if err := validID("transaction", v.Tx.ID); err != nil {
			return err
		}
		if err := validHost(v.Tx.To); err != nil {
			return err
		}
	}
	return nil
}

func (s *Standby) validate() error {
	if err := checkVersion(s.V); err != nil {
		return err
	}
	if err := validID("VM", s.VM); err != nil {
		return err
	}
	if err := validHost(s.Host); err != nil {
		return err
	}
	if s.Generation > MaxGeneration { // 0: assigned, no replica yet (AssignStandby)
		return fmt.Errorf("standby %s/%s: %w: generation %d", s.VM, s.Host, ErrBadRecord, s.Generation)
	}
	return nil
}

func (p *Plan) validate() error {
	if err := checkVersion(p.V); err != nil {
		return err
	}
	if err := validHost(p.Source); err != nil {
		return err
	}
	if err := validText("plan state", p.State, 64); err != nil {
		return err
	}
	if len(p.Items) > maxPlanItems {
		return fmt.Errorf("plan %s: %w: %d items", p.Source, ErrBadRecord, len(p.Items))
	}
	for _, it := range p.Items {
		if err := validID("VM", it.VM); err != nil {
			return err
		}
		if it.Dest != "" {
			if err := validHost(it.Dest); err != nil {
				return err
			}
		}
		if it.Generation > MaxGeneration {
			return fmt.Errorf("plan %s: VM %s: %w: generation %d", p.Source, it.VM, ErrBadRecord, it.Generation)
		}
		if err := validText("item state", it.State, 64); err != nil {
			return err
		}
		if err := validText("item detail", it.Detail, 1024); err != nil {
			return err
		}
	}
	return nil
}

// ---- encoding ----

type validator interface{ validate() error }

// encode marshals a record after validating it. encoding/json writes
// struct fields in declaration order, so the bytes are canonical.
func encode(v validator) ([]byte, error) {
	if err := v.validate(); err != nil {
		return nil, err
	}
	return json.Marshal(v)
}

// decodeStrict decodes one JSON record of at most max bytes, refusing
// unknown fields and trailing data, then validates it.
func decodeStrict(b []byte, max int, v validator) error {
	if len(b) > max {
		return fmt.Errorf("%w: %d bytes, limit %d", ErrBadRecord, len(b), max)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%w: %v", ErrBadRecord, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return fmt.Errorf("%w: trailing data after the record", ErrBadRecord)
	}
	return v.validate()
}

// DecodeHost decodes a host record strictly (unknown fields, size, version
// and every field checked).
func DecodeHost(b []byte) (Host, error) {
	var h Host
	err := decodeStrict(b, MaxRecordBytes, &h)
	return h, err
}

// DecodeEnrolment decodes an enrolment record strictly.
func DecodeEnrolment(b []byte) (Enrolment, error) {
	var e Enrolment
	err := decodeStrict(b, MaxRecordBytes, &e)
	return e, err
}

// DecodeVM decodes a VM record strictly. The record must also be in its
// canonical encoding, because changes compare it byte for byte.
func DecodeVM(b []byte) (VM, error) {
	var v VM
	if err := decodeStrict(b, MaxRecordBytes, &v); err != nil {
		return VM{}, err
	}
	if c, _ := json.Marshal(&v); !bytes.Equal(c, b) {
		return VM{}, fmt.Errorf("VM %s: %w: not in canonical encoding", v.ID, ErrBadRecord)
	}
	return v, nil
}

// DecodeStandby decodes a standby record strictly.
func DecodeStandby(b []byte) (Standby, error) {
	var s Standby
	err := decodeStrict(b, MaxRecordBytes, &s)
	return s, err
}

// DecodePlan decodes an evacuation plan strictly.
func DecodePlan(b []byte) (Plan, error) {
	var p Plan
	err := decodeStrict(b, MaxPlanBytes, &p)
	return p, err
}

func decodeState(b []byte) (HostState, error) {
	var s stateRecord
	if err := decodeStrict(b, MaxRecordBytes, &s); err != nil {
		return "", err
	}
	if c, _ := json.Marshal(&s); !bytes.Equal(c, b) {
		return "", fmt.Errorf("%w: host state not in canonical encoding", ErrBadRecord)
	}
	return s.State, nil
}

func decodeLive(b []byte) (liveRecord, error) {
	var l liveRecord
	err := decodeStrict(b, MaxRecordBytes, &l)
	return l, err
}

// stateValue is the canonical encoding of a host state (CAS compares it).
func stateValue(s HostState) string {
	b, _ := json.Marshal(&stateRecord{V: Version, State: s})
	return string(b)
}
