package registry

import (
	"context"
	"fmt"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// Reenrolment applies the re-enrolment rules to a host's current
// enrolment old and state, and returns the record that replaces old: e's
// new identity, with old's identity appended to Replaced. It is the rule
// table both the registry and its fake apply:
//
//   - e's identity is not old's: ErrSameIdentity, rule reenroll-new-identity;
//   - the host is fenced (retired): ErrNotRetired, rule reenroll-needs-retired;
//   - neither e's EK nor its AK is old's or one replaced before:
//     ErrIdentityRetired, rule identity-retired (a dead or stolen TPM is
//     never trusted again).
func Reenrolment(old Enrolment, state HostState, e Enrolment, now time.Time) (Enrolment, error) {
	if e.Identity == old.Identity {
		// Also what a re-enrolment sent again after an unknown outcome
		// (ErrNoQuorum) finds when the first one took effect.
		return Enrolment{}, fmt.Errorf("%w: EK %s…, AK %s…: nothing to replace (rule reenroll-new-identity)", ErrSameIdentity, short(e.Identity.EK), short(e.Identity.AK))
	}
	if state != StateFenced {
		s := string(state)
		if s == "" {
			s = "without a state"
		}
		return Enrolment{}, fmt.Errorf("%w: %s is %s; retire it first (vtpmctl host retire %s): only a retired host's TPM identity is replaced (rule reenroll-needs-retired)",
			ErrNotRetired, e.Host, s, e.Host)
	}
	replaced := append(append([]ReplacedIdentity(nil), old.Replaced...),
		ReplacedIdentity{Identity: old.Identity, At: old.At, Replaced: now.UTC(), By: e.By})
	for _, r := range replaced {
		switch {
		case e.Identity.EK == r.Identity.EK:
			return Enrolment{}, fmt.Errorf("%w: EK %s… is the one %s was enrolled with until %s; a replaced TPM is never trusted again (rule identity-retired)",
				ErrIdentityRetired, short(e.Identity.EK), e.Host, r.Replaced.Format(time.RFC3339))
		case e.Identity.AK == r.Identity.AK:
			return Enrolment{}, fmt.Errorf("%w: AK %s… is the one %s was enrolled with until %s; a replaced TPM is never trusted again (rule identity-retired)",
				ErrIdentityRetired, short(e.Identity.AK), e.Host, r.Replaced.Format(time.RFC3339))
		}
	}
	if len(replaced) > MaxReplaced {
		return Enrolment{}, fmt.Errorf("%w: %s's TPM was replaced %d times, at most %d are kept; enrol it under a new name", ErrBadRecord, e.Host, len(replaced)-1, MaxReplaced)
	}
	e.V = Version
	e.Replaced = replaced
	if e.At.IsZero() {
		e.At = now.UTC()
	}
	if err := e.validate(); err != nil {
		return Enrolment{}, err
	}
	return e, nil
}

func short(h string) string {
	if len(h) > 16 {
		return h[:16]
	}
	return h
}

// Reenroll implements Fleet: it replaces a retired host's enrolment with
// a new TPM identity (the host's TPM was replaced, `vtpmd init` ran on the
// new one) and makes the host active again. It reads the enrolment and the
// state (one round trip), applies Reenrolment's rules, and writes the new
// record and the state active in one compare-and-swap on both keys' exact
// revisions (a second round trip): a concurrent change of either fails it
// with ErrConflict and changes nothing. It returns the record written.
func (c *Client) Reenroll(ctx context.Context, e Enrolment) (Enrolment, error) {
	op := "registry: re-enrol " + e.Host
	if err := validHost(e.Host); err != nil {
		return Enrolment{}, fmt.Errorf("%s: %w", op, err)
	}
	if e.By == "" {
		e.By = c.cfg.Host
	}
	ek, sk := c.k.enrol(e.Host), c.k.state(e.Host)
	var resp *clientv3.TxnResponse
	err := c.read(ctx, op, func(ctx context.Context) (err error) {
		resp, err = c.kv.Txn(ctx).Then(clientv3.OpGet(ek), clientv3.OpGet(sk)).Commit()
		return err
	})
	if err != nil {
		return Enrolment{}, err
	}
	ekv, skv := resp.Responses[0].GetResponseRange().Kvs, resp.Responses[1].GetResponseRange().Kvs
	if len(ekv) == 0 {
		return Enrolment{}, fmt.Errorf("%s: %w (rule enrolled): enrol it with vtpmctl host enroll", op, ErrNotEnrolled)
	}
	old, err := DecodeEnrolment(ekv[0].Value)
	if err != nil {
		return Enrolment{}, fmt.Errorf("%s: %w", op, err)
	}
	var state HostState
	var stateRev int64
	if len(skv) == 1 {
		if state, err = decodeState(skv[0].Value); err != nil {
			return Enrolment{}, fmt.Errorf("%s: %w", op, err)
		}
		stateRev = skv[0].ModRevision
	}
	rec, err := Reenrolment(old, state, e, c.cfg.Now())
	if err != nil {
		return Enrolment{}, fmt.Errorf("%s: %w", op, err)
	}
	val, err := encode(&rec)
	if err != nil {
		return Enrolment{}, fmt.Errorf("%s: %w", op, err)
	}
	err = c.do(ctx, op, func(ctx context.Context) (err error) {
		resp, err = c.kv.Txn(ctx).
			If(clientv3.Compare(clientv3.ModRevision(ek), "=", ekv[0].ModRevision),
				clientv3.Compare(clientv3.ModRevision(sk), "=", stateRev)).
			Then(clientv3.OpPut(ek, string(val)), clientv3.OpPut(sk, stateValue(StateActive))).Commit()
		return err
	})
	if err != nil {
		return Enrolment{}, err
	}
	if !resp.Succeeded {
		return Enrolment{}, fmt.Errorf("%s: %w: its enrolment or state changed since it was read; nothing was written", op, ErrConflict)
	}
	return rec, nil
}
