package daemon

import (
	"context"
	"fmt"
	"strings"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/internal/audit"
	"github.com/vtpmm/vtpmm/migrate"
)

// auditReenrolment records, after a successful TPM check for a
// re-enrolment (vtpmctl host reenroll), the old and the new EK digests in
// the audit log (the operator then replaces the registry's enrolment).
func (d *Daemon) auditReenrolment(ctx context.Context, host, oldEK string, res *migrate.EnrollResult) {
	if len(oldEK) > 132 || strings.Trim(oldEK, "0123456789abcdef") != "" {
		oldEK = "(malformed)"
	}
	rec := audit.Record{Event: audit.EventHostEnrolled, Peer: host, Rule: "identity-retired",
		Detail: fmt.Sprintf("re-enrolment check: new TPM EK %x AK %x replaces EK %s, never trusted again", res.EKDigest, res.AKName, oldEK)}
	if err := d.audit.Append(ctx, rec); err != nil {
		d.log.WithError(err).WithField("host", host).Warn("audit of a re-enrolment check failed")
	}
	d.log.WithFields(logrus.Fields{"host": host, "ek": fmt.Sprintf("%x", res.EKDigest), "replaces_ek": oldEK}).Info("re-enrolment check passed")
}
