package main

import (
	"errors"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/internal/errclass"
	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/migrate/registry/operator"
)

// reenrollCommand is 'vtpmctl host reenroll HOST': a retired host whose
// TPM was replaced comes back under its name (operator.Reenroll).
func reenrollCommand(e *env, rf *registryFlags, client func() *adminapi.Client) *cobra.Command {
	var addr string
	var wait time.Duration
	c := &cobra.Command{
		Use:   "reenroll HOST",
		Short: "Enrol a retired HOST again with its new TPM (after vtpmd init on it); its old TPM is never trusted again",
		Long: "reenroll is for a host whose TPM died or was replaced (with the motherboard): after\n" +
			"'vtpmctl host retire HOST' and 'vtpmd init' on the new TPM, it waits for HOST's vtpmd to register\n" +
			"its new TPM identity, has the local vtpmd check the new TPM as 'host enroll' does (EK chain and\n" +
			"credential activation, or its AK certificate), and replaces HOST's enrolment in the fleet\n" +
			"registry in one compare-and-swap: HOST is active again, and the replaced identity stays on its\n" +
			"record, never trusted again. The VMs HOST owned stay at their generations: restore them from\n" +
			"their bundles (vtpmctl restore BUNDLE --to HOST). Refused (exit 2): HOST not retired (rule\n" +
			"reenroll-needs-retired), the identity it is enrolled with (reenroll-new-identity), a TPM it was\n" +
			"enrolled with before (identity-retired), HOST not enrolled, its TPM check failing. Exit 5 when\n" +
			"HOST's records changed meanwhile (nothing written), 6 when the registry has no quorum.",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			host := args[0]
			return rf.with(cmd.Context(), func(reg *registry.Client) error {
				rep, err := operator.Reenroll(cmd.Context(), reg, client(), host, operator.EnrollOptions{Addr: addr, Wait: wait, By: rf.user})
				if err != nil {
					return reenrollExit(err)
				}
				info := rep.Info
				fmt.Fprintf(e.stdout, "%s re-enrolled in the fleet registry by %s (%s): EK %s… replaces EK %s… (never trusted again); AK %s…; %s is active\n",
					host, rf.user, info.Method, short(rep.New.EK), short(rep.Old.EK), short(rep.New.AK), host)
				fmt.Fprintf(e.stdout, "  TPM check on %s: %s; registry: %d requests; total %s\n", client().Socket(), rep.Check.Round(time.Millisecond),
					rep.RegistryOps, rep.Took.Round(time.Millisecond))
				fmt.Fprintf(e.stdout, "  its VMs come back from their bundles: vtpmctl restore BUNDLE --to %s --identity ...\n", host)
				return nil
			})
		},
	}
	c.Flags().StringVar(&addr, "addr", "", "HOST's agent wire address, if it is not registered")
	c.Flags().DurationVar(&wait, "wait", 60*time.Second, "how long to wait for HOST to register its new TPM identity")
	return c
}

// reenrollExit: the re-enrolment's refusals exit 2, a concurrent change
// of the host's records 5 (busy: nothing written, run it again), no quorum 6.
func reenrollExit(err error) error {
	if errors.Is(err, registry.ErrConflict) {
		return &exitError{code: 5, err: err}
	}
	for _, s := range []error{registry.ErrNotRetired, registry.ErrSameIdentity, registry.ErrIdentityRetired, registry.ErrNotEnrolled,
		operator.ErrIdentityMismatch, errclass.Refused} {
		if errors.Is(err, s) {
			return &exitError{code: exitRefused, err: err}
		}
	}
	return registryExit(err)
}

func short(h string) string {
	if len(h) > 16 {
		return h[:16]
	}
	return h
}
