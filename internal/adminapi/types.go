package adminapi

import (
	"time"

	"github.com/vtpmm/vtpmm/internal/audit"
	"github.com/vtpmm/vtpmm/internal/errclass"
)

// Paths of the admin API.
const (
	PathMigrate      = "/v1/migrate"      // POST MigrateRequest -> stream of MigrateEvent
	PathVMs          = "/v1/vms"          // GET -> []VMInfo; GET PathVMs/{ref} -> VMInfo; POST CreateVMRequest -> VMInfo; POST PathVMs/{ref}/rekey -> RekeyInfo
	PathFleetVMs     = "/v1/fleet/vms"    // GET -> []FleetVM (the fleet registry's VM records)
	PathRegistry     = "/v1/registry"     // GET -> RegistryInfo
	PathHosts        = "/v1/hosts"        // GET -> []HostInfo; POST PathHosts/{host}/enroll -> EnrollInfo
	PathAudit        = "/v1/audit"        // GET ?vm=&event= -> AuditLog
	PathHookPull     = "/v1/hook/pull"    // POST HookRequest -> HookPullResponse (403: refused)
	PathHookPrepare  = "/v1/hook/prepare" // POST HookRequest -> HookPrepareResponse (403: refused)
	PathHookReleased = "/v1/hook/released"
)

// HookTimeout bounds a hook call: libvirt waits for the hook meanwhile.
const HookTimeout = 2 * time.Minute

// ErrorResponse is the body of every error answer.
type ErrorResponse struct {
	Error   string        `json:"error"`
	Code    errclass.Code `json:"code,omitempty"`
	Reasons []string      `json:"reasons,omitempty"`
}

// Err decodes the answer into an error that matches its classes.
func (e ErrorResponse) Err() error {
	return errclass.Decode(e.Error, e.Code, e.Reasons)
}

// NewErrorResponse encodes err with its code and reasons.
func NewErrorResponse(err error) ErrorResponse {
	return ErrorResponse{Error: err.Error(), Code: errclass.CodeOf(err), Reasons: errclass.Reasons(err)}
}

// MigrateRequest is POST PathMigrate.
type MigrateRequest struct {
	VMs []string `json:"vms"` // names or UUIDs
	To  string   `json:"to"`
}

// MigrateEvent is one line of the PathMigrate stream: a phase, or the end.
type MigrateEvent struct {
	Phase  string  `json:"phase,omitempty"`
	Detail string  `json:"detail,omitempty"`
	Done   bool    `json:"done,omitempty"`
	Result *Result `json:"result,omitempty"`
	Error  string  `json:"error,omitempty"`
	// Code classifies the end: ok, refused, aborted, unresolved, busy, error.
	Code    errclass.Code `json:"code,omitempty"`
	Reasons []string      `json:"reasons,omitempty"`
}

// Err is the end event's error (nil when the migration succeeded).
func (e MigrateEvent) Err() error {
	if e.Code == errclass.CodeOK && e.Error == "" {
		return nil
	}
	return errclass.Decode(e.Error, e.Code, e.Reasons)
}

// Result reports a migration (migrate.Result).
type Result struct {
	TxID       string
	Committed  []string          // now owned by the destination
	Failed     map[string]string // VM -> reason; still owned by the source
	Warm       bool              // destination evidence was reused
	RoundTrips struct{ Before, After int }
	// Registry is the fleet registry's part on the source: its round
	// trips (2 per batch: Begin, Commit) and their wall time.
	Registry struct {
		RoundTrips int
		Time       time.Duration
	}
}

// RekeyInfo is the answer to POST PathVMs/{ref}/rekey: the VM's key was
// replaced and its vTPM state re-encrypted under the new one.
type RekeyInfo struct {
	UUID       string `json:"uuid"`
	Generation uint64 `json:"generation"` // unchanged: a rekey is no ownership step
	Bytes      int    `json:"bytes"`      // vTPM state re-encrypted
	Took       string `json:"took"`
}

// VMInfo is a VM as GET PathVMs reports it.
type VMInfo struct {
	Name         string `json:"name"`
	UUID         string `json:"uuid"`
	Generation   uint64 `json:"generation"`
	State        string `json:"state"` // hypervisor state here
	Owned        bool   `json:"owned"` // this host holds the active key
	PendingTx    string `json:"pending_tx,omitempty"`
	Transactions []Tx   `json:"transactions,omitempty"`
	// Damaged says why this host cannot use the VM's key (its envelope is
	// damaged): the VM is listed, marked, and every other VM stays usable.
	Damaged string `json:"damaged,omitempty"`
	// Rotate: the VM's key came by migration and is replaced at its next
	// cold start ('vtpmctl vm rekey' replaces it now).
	Rotate bool `json:"rotate,omitempty"`
	// DomainOn names the host that holds the VM's domain and vTPM state
	// while its key is here (the host lost its ledger with its TPM during
	// the VM's migration): vtpmd moves the key there once that host is
	// attested (migrate.Reunite).
	DomainOn string `json:"domain_on,omitempty"`
	// Standbys are the VM's standby hosts (fleet registry) and Replica
	// this host's own replica of it, if any (issue 15).
	Standbys []StandbyInfo `json:"standbys,omitempty"`
	Replica  *StandbyInfo  `json:"replica,omitempty"`
}

// Tx is a transaction as a host's ledger records it (migrate.Tx).
type Tx struct {
	ID      string    `json:"id"`
	Role    string    `json:"role"`
	Peer    string    `json:"peer"`
	State   string    `json:"state"`
	VMs     []TxVM    `json:"vms"`
	Reason  string    `json:"reason,omitempty"`
	Pulled  bool      `json:"pulled,omitempty"`
	Lease   time.Time `json:"lease,omitzero"`
	Created time.Time `json:"created"`
	Updated time.Time `json:"updated"`
}

// TxVM is one VM of a transaction (migrate.TxVM).
type TxVM struct {
	UUID       string `json:"uuid"`
	Name       string `json:"name,omitempty"`
	Generation uint64 `json:"generation"`
	Outcome    string `json:"outcome,omitempty"`
	Error      string `json:"error,omitempty"`
}

// HostInfo is a host as GET PathHosts reports it: with a fleet registry,
// every host the registry knows (its record, state, liveness and
// enrolment); in registry mode none, this host and its static peers with
// their reachability over mutual TLS.
type HostInfo struct {
	Host      string `json:"host"`
	Address   string `json:"address"`
	Self      bool   `json:"self,omitempty"`
	Reachable bool   `json:"reachable"`
	Error     string `json:"error,omitempty"`
	// Registry modes only.
	Registered bool      `json:"registered,omitempty"` // the host wrote its record
	State      string    `json:"state,omitempty"`      // active, draining, fenced ("" not enrolled)
	Live       bool      `json:"live,omitempty"`       // its liveness lease is alive
	Enrolled   bool      `json:"enrolled,omitempty"`
	EnrolledBy string    `json:"enrolled_by,omitempty"`
	EnrolledAt time.Time `json:"enrolled_at,omitzero"`
	Method     string    `json:"method,omitempty"` // activation, ak-certificate
	EK         string    `json:"ek,omitempty"`     // the enrolled EK digest (hex)
	AK         string    `json:"ak,omitempty"`     // the enrolled AK name (hex)
}

// EnrollRequest is the (optional) body of POST PathHosts/{host}/enroll.
type EnrollRequest struct {
	// Addr is HOST's agent wire address, when neither the static peers
	// nor the fleet registry know it yet.
	Addr string `json:"addr,omitempty"`
	// Replaces is the EK digest (hex) of the TPM identity the checked one
	// is to replace (vtpmctl host reenroll): vtpmd's audit record of the
	// check names both.
	Replaces string `json:"replaces,omitempty"`
}

// EnrollInfo is the answer of POST PathHosts/{host}/enroll: the verified
// record. With a fleet registry vtpmd does not record it (hosts may not
// write enrolments): vtpmctl writes it to the registry.
type EnrollInfo struct {
	Host         string        `json:"host"`
	EKChain      string        `json:"ek_chain"`
	EKDigest     string        `json:"ek_digest"`
	AKName       string        `json:"ak_name"`
	Method       string        `json:"method,omitempty"`
	AKCertDigest string        `json:"ak_cert_digest,omitempty"`
	EnrolledAt   time.Time     `json:"enrolled_at,omitzero"`
	Registry     bool          `json:"registry,omitempty"` // vtpmd runs with a fleet registry: record it there
	Error        string        `json:"error,omitempty"`
	Code         errclass.Code `json:"code"`
	Reasons      []string      `json:"reasons,omitempty"`
}

// RegistryInfo is the answer of GET PathRegistry: how vtpmd reaches the
// fleet registry (operator tools use the endpoints with their own
// certificate).
type RegistryInfo struct {
	Mode       string   `json:"mode"` // none, embedded, etcd
	Host       string   `json:"host"`
	Endpoints  []string `json:"endpoints,omitempty"`
	Prefix     string   `json:"prefix,omitempty"`
	CAFile     string   `json:"ca_file,omitempty"`
	Live       bool     `json:"live,omitempty"`        // this host's lease is known alive
	RoundTrips int64    `json:"round_trips,omitempty"` // etcd KV round trips this vtpmd made
	ViewRev    int64    `json:"view_rev,omitempty"`    // revision of its last view
}

// FleetVM is a VM as the fleet registry records it (GET PathFleetVMs),
// with what the asking host knows about it.
type FleetVM struct {
	UUID       string `json:"uuid"`
	Name       string `json:"name,omitempty"` // when this host knows it
	Owner      string `json:"owner"`
	Generation uint64 `json:"generation"`
	TxID       string `json:"tx,omitempty"` // an open migration
	TxTo       string `json:"tx_to,omitempty"`
	OwnerState string `json:"owner_state,omitempty"`
	OwnerLive  bool   `json:"owner_live"`
}

// FleetVMs is the answer of GET PathFleetVMs.
type FleetVMs struct {
	Rev int64     `json:"rev"`
	VMs []FleetVM `json:"vms"`
	// Stale is set when the registry had no quorum: the list is this
	// host's last view.
	Stale bool   `json:"stale,omitempty"`
	Error string `json:"error,omitempty"`
}

// CreateVMRequest is POST PathVMs: a new vTPM for a VM, created by vtpmd
// (key, encrypted swtpm state, the fleet registry's record at generation
// 1, the hypervisor's secret).
type CreateVMRequest struct {
	Name string `json:"name"`
	UUID string `json:"uuid,omitempty"`
}

// Err is the enrolment's error (nil when HOST was enrolled).
func (e EnrollInfo) Err() error {
	if e.Code == errclass.CodeOK {
		return nil
	}
	return errclass.Decode(e.Error, e.Code, e.Reasons)
}

// AuditLog is the answer of GET PathAudit.
type AuditLog struct {
	Records []audit.Record `json:"records"`
	Total   int            `json:"total"`
	Head    string         `json:"head"`
	// Chain is "intact", or why the hash chain is broken.
	Chain string `json:"chain"`
}

// ChainIntact is AuditLog.Chain for an intact chain.
const ChainIntact = "intact"

// HookRequest is the body of the hook calls.
type HookRequest struct {
	UUID string `json:"uuid"`
	Name string `json:"name,omitempty"`
}

// HookPullResponse reports a pull.
type HookPullResponse struct {
	TxID  string `json:"tx"`
	Owner string `json:"owner"`
	Warm  bool   `json:"warm,omitempty"`
	Took  string `json:"took"`
}

// HookPrepareResponse reports a prepare: the status, and the key's
// generation when the secret was defined, or the incoming transaction.
type HookPrepareResponse struct {
	Status     string `json:"status"`
	Generation uint64 `json:"generation,omitempty"`
	TxID       string `json:"tx,omitempty"`
}

// HookReleasedResponse acknowledges a release (vtpmd settles later).
type HookReleasedResponse struct {
	Status string `json:"status"`
}
