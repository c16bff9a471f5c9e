// Package operator owns the operator's flows on the fleet registry that
// involve a vtpmd: enrolling a host once for the whole fleet (its TPM
// checked by the local vtpmd, the record written to the registry with the
// operator's own certificate, since hosts may not write enrolments). vtpmctl
// runs them; the test fleets run the same code.
package operator

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/migrate/registry"
)

// ErrIdentityMismatch means the TPM identity a host registered is not the
// one its TPM proved to the operator's check: the enrolment is refused.
var ErrIdentityMismatch = errors.New("the host's registered TPM identity differs from the one its TPM proved")

// EnrollOptions configures Enroll.
type EnrollOptions struct {
	// Addr is the host's agent wire address when it cannot register yet
	// (the check then dials it there).
	Addr string
	// Wait bounds how long Enroll waits for the host to register itself
	// after its etcd user was added (default 60 s; it retries every
	// second or so). With Addr set it does not wait.
	Wait time.Duration
	// By is the operator's name in the record (default: the registry
	// client's user).
	By string
}

// EnrollReport is what an enrolment did and cost.
type EnrollReport struct {
	Info adminapi.EnrollInfo // the local vtpmd's verified record
	// RegistryOps are the operator's registry requests: the host's etcd
	// user and roles, the reads while waiting for its registration, and
	// the enrolment record.
	RegistryOps int
	Took        time.Duration
	// Check is the time the TPM check took (EK chain and activation, or
	// the AK certificate), on the local vtpmd.
	Check time.Duration
}

// Enroll enrols host once for the whole fleet: it gives the host its etcd
// user and roles (so that it can register; idempotent), waits until the
// host has registered its address and TPM identity, has the local vtpmd
// (admin) check its TPM (EK certificate chain and credential activation,
// or its AK certificate when the policy allows it), checks that the
// identity the host registered is the one proved, and writes the
// enrolment record with op (the operator's client, etcd's root role).
// Every host trusts that record from then on.
func Enroll(ctx context.Context, op *registry.Client, admin *adminapi.Client, host string, opts EnrollOptions) (EnrollReport, error) {
	t0 := time.Now()
	var rep EnrollReport
	n, err := op.AddHostUser(ctx, host)
	rep.RegistryOps += n
	if err != nil {
		return rep, fmt.Errorf("enroll %s: add its registry user: %w", host, err)
	}
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
			return rep, fmt.Errorf("enroll %s: %w", host, err)
		}
		registered = v.Hosts[host].Host
		if registered != nil || opts.Addr != "" || time.Now().After(deadline) {
			break
		}
		select {
		case <-ctx.Done():
			return rep, ctx.Err()
		case <-time.After(time.Second):
		}
	}
	req := adminapi.EnrollRequest{Addr: opts.Addr}
	if registered == nil && opts.Addr == "" {
		return rep, fmt.Errorf("enroll %s: it has not registered in the fleet registry within %v (is its vtpmd running with this registry?); or give its address", host, wait)
	}
	info, took, id, err := proveIdentity(ctx, admin, "enroll", host, req, registered)
	rep.Check, rep.Info = took, info
	if err != nil {
		return rep, err
	}
	e := enrolment(host, id, opts.By, info)
	rep.RegistryOps++
	if err := op.Enroll(ctx, e); err != nil {
		return rep, fmt.Errorf("enroll %s: %w", host, err)
	}
	rep.Took = time.Since(t0)
	return rep, nil
}

// enrolment is the registry record of a verified enrolment check.
func enrolment(host string, id registry.Identity, by string, info adminapi.EnrollInfo) registry.Enrolment {
	e := registry.Enrolment{Host: host, Identity: id, By: by, At: info.EnrolledAt, Method: info.Method, AKCert: info.AKCertDigest}
	if e.Method == registry.MethodActivation {
		e.Method = "" // the default
	}
	if info.EKChain != "" {
		e.Detail = firstLine(info.EKChain)
	}
	return e
}

func short(h string) string {
	if len(h) > 16 {
		return h[:16]
	}
	return h
}

func firstLine(s string) string {
	for i, r := range s {
		if r == '\n' {
			s = s[:i]
			break
		}
	}
	if len(s) > 1000 {
		s = s[:1000]
	}
	return s
}

// proveIdentity has the local vtpmd check host's TPM (admin.EnrollWith:
// activation or AK certificate) and compares the identity proved with the
// one host registered (if it did), whose migration key it keeps. It
// returns the check's answer, how long it took and the identity.
func proveIdentity(ctx context.Context, admin *adminapi.Client, what, host string, req adminapi.EnrollRequest, registered *registry.Host) (adminapi.EnrollInfo, time.Duration, registry.Identity, error) {
	t1 := time.Now()
	info, err := admin.EnrollWith(ctx, host, req)
	took := time.Since(t1)
	if err != nil {
		return info, took, registry.Identity{}, fmt.Errorf("%s %s: %w", what, host, err)
	}
	id := registry.Identity{EK: info.EKDigest, AK: info.AKName}
	if registered != nil {
		if registered.Identity.EK != id.EK || registered.Identity.AK != id.AK {
			return info, took, id, fmt.Errorf("%s %s: %w: registered EK %s… AK %s…, proved EK %s… AK %s…", what, host, ErrIdentityMismatch,
				short(registered.Identity.EK), short(registered.Identity.AK), short(id.EK), short(id.AK))
		}
		id.MK = registered.Identity.MK
	}
	return info, took, id, nil
}
