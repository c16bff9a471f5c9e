package evacuate

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"regexp"
	"time"
)

// RecordVersion is the version of the evacuation record this code writes
// and reads.
const RecordVersion = 1

// Limits of a record (etcd's default request limit is 1.5 MiB).
const (
	maxRecordBytes = 1 << 20
	maxRecordVMs   = 4096
	maxRecordHosts = 1024
)

// RecordState is where an evacuation stands.
type RecordState string

// Record states.
const (
	StateRunning     RecordState = "running"     // a holder runs it (or died running it)
	StateInterrupted RecordState = "interrupted" // stopped by the operator; run again to continue
	StateIncomplete  RecordState = "incomplete"  // ended with VMs left on the source (failed, refused, open, no room)
	StateDone        RecordState = "done"        // every VM left the source
)

// Holder is the process running an evacuation: its ID and its registry
// session (etcd: the lease its process keeps alive). A holder whose
// session died crashed; its record may be taken over at once.
type Holder struct {
	ID      string `json:"id"`
	Session string `json:"session"`
}

// RecordOptions are the operator's options, kept so that a resumed run
// reports what it continues.
type RecordOptions struct {
	To       []string `json:"to,omitempty"`
	Parallel int      `json:"parallel"`
	Headroom uint64   `json:"headroom"`
}

// ExcludedHost is a host taken out of the plan during the evacuation.
type ExcludedHost struct {
	Host   string `json:"host"`
	Reason Reason `json:"reason"`
	Rule   string `json:"rule,omitempty"`
	Detail string `json:"detail,omitempty"`
}

// VMOutcome is one VM's outcome at the end of a run.
type VMOutcome struct {
	VM         string  `json:"vm"`
	Outcome    Outcome `json:"outcome"`
	Host       string  `json:"host,omitempty"` // moved: the destination; otherwise where it runs
	Generation uint64  `json:"generation,omitempty"`
	Rule       string  `json:"rule,omitempty"`
	Detail     string  `json:"detail,omitempty"`
}

// Record is one source host's evacuation, stored in the registry (one
// record per source host). The plan is here; the progress of each VM is
// its own record's owner, generation and open transaction, so the record
// is written only when a run starts, when the plan changes (a refusal, a
// destination failing) and when a run ends.
type Record struct {
	Version  int            `json:"version"`
	Source   string         `json:"source"`
	State    RecordState    `json:"state"`
	Holder   *Holder        `json:"holder,omitempty"`
	Started  time.Time      `json:"started"`
	Updated  time.Time      `json:"updated"`
	Runs     int            `json:"runs"`
	Options  RecordOptions  `json:"options"`
	Plan     []Assignment   `json:"plan"`
	Excluded []ExcludedHost `json:"excluded,omitempty"`
	Outcomes []VMOutcome    `json:"outcomes,omitempty"`
}

var (
	uuidRE   = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`)
	hostIDRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$`)
)

// EncodeRecord validates and encodes r.
func EncodeRecord(r *Record) ([]byte, error) {
	if err := r.validate(); err != nil {
		return nil, fmt.Errorf("encode evacuation record: %w", err)
	}
	b, err := json.Marshal(r)
	if err != nil {
		return nil, fmt.Errorf("encode evacuation record: %w", err)
	}
	if len(b) > maxRecordBytes {
		return nil, fmt.Errorf("encode evacuation record: %w: %d bytes (limit %d)", ErrBadRecord, len(b), maxRecordBytes)
	}
	return b, nil
}

// DecodeRecord decodes and validates a record read from the registry:
// unknown fields, trailing data, another version or any invalid field are
// refused (ErrBadRecord).
func DecodeRecord(b []byte) (*Record, error) {
	if len(b) > maxRecordBytes {
		return nil, fmt.Errorf("decode evacuation record: %w: %d bytes (limit %d)", ErrBadRecord, len(b), maxRecordBytes)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var r Record
	if err := dec.Decode(&r); err != nil {
		return nil, fmt.Errorf("decode evacuation record: %w: %v", ErrBadRecord, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, fmt.Errorf("decode evacuation record: %w: trailing data", ErrBadRecord)
	}
	if err := r.validate(); err != nil {
		return nil, fmt.Errorf("decode evacuation record: %w", err)
	}
	return &r, nil
}

func (r *Record) validate() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s", ErrBadRecord, fmt.Sprintf(format, a...))
	}
	switch {
	case r.Version != RecordVersion:
		return bad("version %d (this code reads %d)", r.Version, RecordVersion)
	case !hostIDRE.MatchString(r.Source):
		return bad("source host %q", r.Source)
	case r.Runs < 0:
		return bad("runs %d", r.Runs)
	case r.Options.Parallel < 0 || r.Options.Parallel > 1024:
		return bad("parallel %d (0..1024)", r.Options.Parallel)
	case len(r.Plan) > maxRecordVMs || len(r.Outcomes) > maxRecordVMs:
		return bad("%d planned VMs, %d outcomes (limit %d)", len(r.Plan), len(r.Outcomes), maxRecordVMs)
	case len(r.Excluded) > maxRecordHosts || len(r.Options.To) > maxRecordHosts:
		return bad("%d excluded hosts, %d --to hosts (limit %d)", len(r.Excluded), len(r.Options.To), maxRecordHosts)
	}
	switch r.State {
	case StateRunning:
		if r.Holder == nil {
			return bad("state running without a holder")
		}
	case StateInterrupted, StateIncomplete, StateDone:
	default:
		return bad("state %q", r.State)
	}
	if h := r.Holder; h != nil && (h.ID == "" || len(h.ID) > 256 || h.Session == "" || len(h.Session) > 256) {
		return bad("holder %q session %q", h.ID, h.Session)
	}
	to := map[string]bool{}
	for _, t := range r.Options.To {
		if !hostIDRE.MatchString(t) || t == r.Source || to[t] {
			return bad("--to host %q (malformed, the source or repeated)", t)
		}
		to[t] = true
	}
	seen := map[string]bool{}
	for _, a := range r.Plan {
		switch {
		case !uuidRE.MatchString(a.VM) || seen[a.VM]:
			return bad("planned VM %q (malformed or repeated)", a.VM)
		case !hostIDRE.MatchString(a.Dest) || a.Dest == r.Source:
			return bad("destination %q of VM %s", a.Dest, a.VM)
		case len(a.Name) > 256:
			return bad("name of VM %s longer than 256 bytes", a.VM)
		}
		seen[a.VM] = true
	}
	hosts := map[string]bool{}
	for _, x := range r.Excluded {
		switch {
		case !hostIDRE.MatchString(x.Host) || hosts[x.Host]:
			return bad("excluded host %q (malformed or repeated)", x.Host)
		case x.Reason != ReasonRefused && x.Reason != ReasonFailed:
			return bad("exclusion reason %q of %s", x.Reason, x.Host)
		case len(x.Rule) > 64 || len(x.Detail) > 1024:
			return bad("exclusion of %s: rule or detail too long", x.Host)
		}
		hosts[x.Host] = true
	}
	seen = map[string]bool{}
	for _, o := range r.Outcomes {
		switch {
		case !uuidRE.MatchString(o.VM) || seen[o.VM]:
			return bad("outcome VM %q (malformed or repeated)", o.VM)
		case !validOutcome(o.Outcome):
			return bad("outcome %q of VM %s", o.Outcome, o.VM)
		case o.Host != "" && !hostIDRE.MatchString(o.Host):
			return bad("host %q of VM %s", o.Host, o.VM)
		case len(o.Rule) > 64 || len(o.Detail) > 1024:
			return bad("outcome of VM %s: rule or detail too long", o.VM)
		}
		seen[o.VM] = true
	}
	return nil
}

func validOutcome(o Outcome) bool {
	switch o {
	case OutcomeMoved, OutcomeFailed, OutcomeOpen, OutcomeNotStarted,
		OutcomeSkipped, OutcomeRefused, OutcomeUnplaced:
		return true
	}
	return false
}
