package attest

import (
	"bytes"
	"context"
	"fmt"
)

// Enrolments bind a host name to its TPM: each record names the host with
// its EK and AK, and the stores refuse a record that would give one EK or
// one AK to a second host (rule enrolled-host). So a host that relays
// another host's identity and activation answers at enrolment time cannot
// get that TPM enrolled under its own name, once the real host is enrolled;
// and Verify (VerifyHost) accepts evidence only from the AK enrolled for the
// host dialled.

// HostFinder is an optional capability of an Enrollments store: the latest
// record of a host (nil, nil when the host is not enrolled). The migration
// engine answers key-bearing and informational calls from enrolled hosts
// only (migrate/authz.go).
type HostFinder interface {
	FindHost(ctx context.Context, host string) (*Enrollment, error)
}

var (
	_ HostFinder = (*MemoryEnrollments)(nil)
	_ HostFinder = (*FileEnrollments)(nil)
)

// EnrolledHost returns the latest enrolment record of host in store, nil
// when the host is not enrolled. A store that cannot look hosts up
// (no HostFinder) enrols nobody by name: it returns an error.
func EnrolledHost(ctx context.Context, store Enrollments, host string) (*Enrollment, error) {
	f, ok := store.(HostFinder)
	if !ok {
		return nil, fmt.Errorf("enrollments: %T cannot look up hosts by name", store)
	}
	return f.FindHost(ctx, host)
}

// latestOfHost returns a copy of the latest record of host.
func latestOfHost(list []Enrollment, host string) *Enrollment {
	for i := len(list) - 1; i >= 0; i-- {
		if list[i].Host == host {
			e := list[i]
			return &e
		}
	}
	return nil
}

// checkIdentity refuses a new record whose EK or AK is already enrolled
// for another host (rule enrolled-host).
func checkIdentity(list []Enrollment, e Enrollment) error {
	if e.Host == "" {
		return refuse(RuleEnrolledHost, "an enrolment record must name its host")
	}
	for _, o := range list {
		if o.Host == e.Host {
			continue
		}
		switch {
		case bytes.Equal(o.EKDigest, e.EKDigest):
			return &RefusalError{Host: e.Host, Rule: RuleEnrolledHost, Detail: fmt.Sprintf(
				"EK %s is enrolled for host %q already: one TPM, one host (a host relaying another's identity? if the TPM really moved, remove %s's records first)",
				short(e.EKDigest), o.Host, o.Host)}
		case bytes.Equal(o.AKName, e.AKName):
			return &RefusalError{Host: e.Host, Rule: RuleEnrolledHost, Detail: fmt.Sprintf(
				"AK %s is enrolled for host %q already", short(e.AKName), o.Host)}
		}
	}
	return nil
}

// FindHost implements HostFinder.
func (m *MemoryEnrollments) FindHost(_ context.Context, host string) (*Enrollment, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return latestOfHost(m.list, host), nil
}

// FindHost implements HostFinder.
func (f *FileEnrollments) FindHost(_ context.Context, host string) (*Enrollment, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	list, err := f.load()
	if err != nil {
		return nil, err
	}
	return latestOfHost(list, host), nil
}
