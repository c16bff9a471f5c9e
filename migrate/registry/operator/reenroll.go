package operator

import (
	"context"
	"fmt"
	"time"

	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/migrate/registry"
)

// ReenrollReport is what a re-enrolment did: the identity replaced, the
// one enrolled, and the cost.
type ReenrollReport struct {
	EnrollReport
	// Old is the identity replaced (kept in the record's Replaced list,
	// never trusted again); New the one enrolled.
	Old, New registry.Identity
}

// Reenroll enrols host again after its TPM was replaced: host must be
// retired (fenced: vtpmctl host retire) and its vtpmd initialised on the
// new TPM (vtpmd init) and registered with its new identity. It waits
// until the host has registered an identity other than the enrolled one,
// has the local vtpmd check the new TPM exactly as a first enrolment does
// (EK chain and credential activation, or the AK certificate), checks the
// registered identity is the one proved, and replaces the enrolment with
// registry.Client.Reenroll (one compare-and-swap; the host becomes active
// and the old identity is never trusted again). The registry refuses a host
// that is not retired (rule reenroll-needs-retired), the identity it is
// enrolled with (reenroll-new-identity) and any identity it was enrolled
// with before (identity-retired).
func Reenroll(ctx context.Context, op *registry.Client, admin *adminapi.Client, host string, opts EnrollOptions) (ReenrollReport, error) {
	t0 := time.Now()
	var rep ReenrollReport
	wait := opts.Wait
	if wait == 0 {
		wait = 60 * time.Second
	}
	var registered *registry.Host
	deadline := time.Now().Add(wait)
	for {
		v, err := op.Hosts(ctx, host)
		rep.RegistryOps++
		if err != nil {
			return rep, fmt.Errorf("re-enrol %s: %w", host, err)
		}
		h := v.Hosts[host]
		if h.Enrolment == nil {
			return rep, fmt.Errorf("re-enrol %s: %w (rule enrolled): a first enrolment is vtpmctl host enroll", host, registry.ErrNotEnrolled)
		}
		rep.Old = h.Enrolment.Identity
		if h.State != registry.StateFenced {
			// Refused before any TPM work (the registry checks it again):
			// the TPM it registered is the enrolled one (nothing to
			// replace: also a re-enrolment run again after its outcome was
			// unknown), or it is not retired.
			probe := registry.Enrolment{Host: host}
			if h.Host != nil {
				probe.Identity = h.Host.Identity
				probe.Identity.MK = h.Enrolment.Identity.MK
			}
			_, err := registry.Reenrolment(*h.Enrolment, h.State, probe, time.Now())
			return rep, fmt.Errorf("re-enrol %s: %w", host, err)
		}
		registered = h.Host
		if (registered != nil && registered.Identity.EK != rep.Old.EK) || opts.Addr != "" || time.Now().After(deadline) {
			break
		}
		select {
		case <-ctx.Done():
			return rep, ctx.Err()
		case <-time.After(time.Second):
		}
	}
	if opts.Addr == "" && (registered == nil || registered.Identity.EK == rep.Old.EK) {
		return rep, fmt.Errorf("re-enrol %s: it has not registered a new TPM identity within %v (run vtpmd init on its new TPM and start vtpmd); or give its address", host, wait)
	}
	info, took, id, err := proveIdentity(ctx, admin, "re-enrol", host, adminapi.EnrollRequest{Addr: opts.Addr, Replaces: rep.Old.EK}, registered)
	rep.Check, rep.Info = took, info
	if err != nil {
		return rep, err
	}
	rep.New = id
	e := enrolment(host, id, opts.By, info)
	rep.RegistryOps += 2
	if _, err := op.Reenroll(ctx, e); err != nil {
		return rep, fmt.Errorf("re-enrol %s: %w", host, err)
	}
	rep.Took = time.Since(t0)
	return rep, nil
}
