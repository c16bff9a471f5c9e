package adminapi

import (
	"time"

	"github.com/vtpmm/vtpmm/internal/audit"
	"github.com/vtpmm/vtpmm/internal/errclass"
)

// Paths of the admin API.
const (
	PathMigrate      = "/v1/migrate"      // POST MigrateRequest -> stream of MigrateEvent
	PathVMs          = "/v1/vms"          // GET -> []VMInfo; GET PathVMs/{ref} -> VMInfo
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

// HostInfo is a host as GET PathHosts reports it.
type HostInfo struct {
	Host      string `json:"host"`
	Address   string `json:"address"`
	Self      bool   `json:"self,omitempty"`
	Reachable bool   `json:"reachable"`
	Error     string `json:"error,omitempty"`
}

// EnrollInfo is the answer of POST PathHosts/{host}/enroll.
type EnrollInfo struct {
	Host     string        `json:"host"`
	EKChain  string        `json:"ek_chain"`
	EKDigest string        `json:"ek_digest"`
	AKName   string        `json:"ak_name"`
	Error    string        `json:"error,omitempty"`
	Code     errclass.Code `json:"code"`
	Reasons  []string      `json:"reasons,omitempty"`
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
