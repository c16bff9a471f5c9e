package adminapi

import (
	"context"
	"net/http"
	"time"
)

// Standby replicas and failover (issue 15, docs/failover.md).
const (
	PathStandby  = "/v1/standby"  // POST StandbyRequest -> StandbyInfo
	PathFailover = "/v1/failover" // POST FailoverRequest -> FailoverReport
)

// StandbyRequest assigns (On) or removes (Off) a VM's standby hosts.
type StandbyRequest struct {
	VM  string   `json:"vm"`
	On  []string `json:"on,omitempty"`
	Off []string `json:"off,omitempty"`
}

// StandbyInfo is one standby of a VM as the registry records it.
type StandbyInfo struct {
	Host string `json:"host"`
	// Generation of the replica it holds (0: assigned, none yet).
	Generation uint64    `json:"generation"`
	Updated    time.Time `json:"updated"`
	// Age is how long ago the standby stored its last replica.
	Age time.Duration `json:"age"`
	// Current: the replica is at the registry's generation.
	Current bool `json:"current"`
}

// StandbySet is a VM's standbys after a StandbyRequest.
type StandbySet struct {
	VM         string        `json:"vm"`
	Owner      string        `json:"owner"`
	Generation uint64        `json:"generation"`
	Standbys   []StandbyInfo `json:"standbys"`
}

// FailoverRequest asks the local vtpmd to promote its replica of VM.
type FailoverRequest struct {
	VM string `json:"vm"`
	// To must name the local host (the failover runs where the replica is).
	To string `json:"to,omitempty"`
	// ConfirmFenced are hosts the operator has fenced (powered off): no
	// fence agent runs for them.
	ConfirmFenced []string `json:"confirm_fenced,omitempty"`
	// NoStart leaves the VM defined but not started (the cloud's HA
	// manager starts it).
	NoStart bool `json:"no_start,omitempty"`
}

// FailoverReport is a promotion: from whom, at which generation, what was
// fenced, and its timing.
type FailoverReport struct {
	VM         string        `json:"vm"`
	Host       string        `json:"host"`
	From       string        `json:"from"`
	Generation uint64        `json:"generation"`
	Fenced     []string      `json:"fenced"`
	Fence      time.Duration `json:"fence"`
	Promote    time.Duration `json:"promote"`
	Start      time.Duration `json:"start"`
	Started    bool          `json:"started"`
	// Began is when this host began the failover (after it saw the
	// owner's lease gone, or the operator asked).
	Began time.Time `json:"began"`
}

// Standby assigns or removes standbys of a VM.
func (c *Client) Standby(ctx context.Context, req StandbyRequest) (StandbySet, error) {
	var out StandbySet
	return out, c.call(ctx, http.MethodPost, PathStandby, req, &out)
}

// Failover asks the local vtpmd to promote its replica.
func (c *Client) Failover(ctx context.Context, req FailoverRequest) (FailoverReport, error) {
	var out FailoverReport
	return out, c.call(ctx, http.MethodPost, PathFailover, req, &out)
}
