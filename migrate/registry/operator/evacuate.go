package operator

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/migrate/registry"
)

// ErrHostFenced means the host to evacuate is fenced: its VMs belong to
// failover, not to an evacuation.
var ErrHostFenced = errors.New("the host is fenced")

// stopTimeout bounds the stop request sent when the operator's context ends.
const stopTimeout = 10 * time.Second

// Evacuate is 'vtpmctl evacuate HOST': unless req.DryRun it marks HOST
// draining with the operator's credentials (a host may not change its own
// state; a fenced host is refused, a draining one left so), then asks
// HOST's vtpmd (admin, its admin socket) to evacuate it, passing every
// event line to event. reg may be nil: vtpmd then marks the host itself,
// which only a registry without RBAC allows.
//
// When ctx ends (Ctrl-C) it asks vtpmd to stop gracefully and keeps
// reading: no new migration starts, those in flight finish and commit,
// and the report and the end still arrive. A vtpmctl killed outright
// closes the stream, which vtpmd takes the same way.
func Evacuate(ctx context.Context, reg *registry.Client, admin *adminapi.Client, req adminapi.EvacuateRequest, event func(line []byte) error) (adminapi.EvacuateEnd, error) {
	if !req.DryRun && reg != nil {
		if err := drain(ctx, reg, req.Host); err != nil {
			return adminapi.EvacuateEnd{}, err
		}
	}
	stream, cancel := context.WithCancel(context.WithoutCancel(ctx))
	defer cancel()
	stop := context.AfterFunc(ctx, func() {
		sctx, scancel := context.WithTimeout(stream, stopTimeout)
		defer scancel()
		if _, err := admin.StopEvacuations(sctx); err != nil {
			cancel() // vtpmd did not answer: closing the stream stops it too
		}
	})
	defer stop()
	return admin.Evacuate(stream, req, event)
}

// drain marks host draining unless it already is; a fenced host is refused.
func drain(ctx context.Context, reg *registry.Client, host string) error {
	v, err := reg.Hosts(ctx, host)
	if err != nil {
		return fmt.Errorf("evacuate %s: %w", host, err)
	}
	h, ok := v.Hosts[host]
	switch {
	case !ok || h.Enrolment == nil:
		return fmt.Errorf("evacuate %s: %w (rule enrolled)", host, registry.ErrNotEnrolled)
	case h.State == registry.StateFenced:
		return fmt.Errorf("evacuate %s: %w: its VMs are taken over by failover", host, ErrHostFenced)
	case h.State == registry.StateDraining:
		return nil
	}
	if err := reg.SetState(ctx, host, registry.StateDraining); err != nil {
		return fmt.Errorf("evacuate %s: mark draining: %w", host, err)
	}
	return nil
}
