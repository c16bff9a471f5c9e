package libvirt

import (
	"context"
	"errors"
	"fmt"
	"time"

	golibvirt "libvirt.org/go/libvirt"

	"github.com/vtpmm/vtpmm/hypervisor"
)

// MigrateFlags are the flags of every vtpmm migration: live, peer to peer
// (the source libvirtd connects to the destination's), persistent on the
// destination and undefined on the source.
const MigrateFlags = golibvirt.MIGRATE_LIVE | golibvirt.MIGRATE_PEER2PEER |
	golibvirt.MIGRATE_PERSIST_DEST | golibvirt.MIGRATE_UNDEFINE_SOURCE

// libvirt's client-side message for a migration that failed on the
// destination after the memory was copied (a wrong vTPM secret, among others).
const lateFailure = "job 'migration out' unexpectedly failed"

// MigrateOptions tunes MigrateWith.
type MigrateOptions struct {
	// NoPrecheck skips the checks on the destination (reachable, secret
	// defined, domain absent), like a plain `virsh migrate`; libvirt's own
	// errors are classified instead.
	NoPrecheck bool
}

// Migrate live-migrates a running VM to dest (MigrateWith with defaults).
func (h *Hypervisor) Migrate(ctx context.Context, vmUUID string, dest hypervisor.Target) error {
	return h.MigrateWith(ctx, vmUUID, dest, MigrateOptions{})
}

// MigrateWith live-migrates a running VM to dest.URI with MigrateToURI3
// and MigrateFlags. It first checks, on the destination, that libvirtd
// answers (ErrUnreachable), that the domain is not there
// (ErrAlreadyExists) and that the VM's secret is defined (ErrSecretMissing),
// so that these refusals come before any memory is copied. libvirt's
// errors are classified onto the hypervisor sentinels. When ctx ends, the
// migration job is aborted; the VM then keeps running here.
func (h *Hypervisor) MigrateWith(ctx context.Context, vmUUID string, dest hypervisor.Target, opt MigrateOptions) error {
	t0 := time.Now()
	op := fmt.Sprintf("migrate %s from %s to %s", vmUUID, h.cfg.Name, targetName(dest))
	if dest.URI == "" {
		return fmt.Errorf("%s: %w: target URI required", op, ErrBadConfig)
	}
	log := h.log.WithField("vm", vmUUID).WithField("dest", targetName(dest))
	params, err := h.migrateParams(ctx, vmUUID)
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	secretUUID := hypervisor.SecretUUID(vmUUID)
	var peer *golibvirt.Connect
	peerURI := dest.URI
	if h.cfg.PeerURI != nil {
		peerURI = h.cfg.PeerURI(dest)
	}
	if !opt.NoPrecheck {
		if peer, err = connect(ctx, peerURI); err != nil {
			return fmt.Errorf("%s: %w", op, err)
		}
		defer peer.Close()
		if err := precheck(peer, vmUUID, secretUUID); err != nil {
			return fmt.Errorf("%s: %w", op, err)
		}
	}
	// The migration runs on a connection of its own (withOwn): the
	// destination's hook may ask this host's vtpmd, which asks libvirt
	// here about the outgoing job. The abort goes through the shared one.
	err = h.withOwn(ctx, func(c *golibvirt.Connect) error {
		d, err := lookup(c, vmUUID)
		if err != nil {
			return err
		}
		defer d.Free()
		return runMigration(ctx, d, dest.URI, params, func() { h.abortJob(vmUUID) })
	})
	if err != nil {
		err = classifyMigrate(err, func() (bool, bool) { return destHasSecret(peer, peerURI, secretUUID) })
		log.WithError(err).WithField("took", time.Since(t0)).Warn("migration failed; VM stays on the source")
		return fmt.Errorf("%s: %w", op, err)
	}
	log.WithField("took", time.Since(t0)).Info("migrated")
	// The source's secret stays: its owner (the migration node) undefines
	// it when the transaction commits.
	return nil
}

func targetName(t hypervisor.Target) string {
	if t.Name != "" {
		return t.Name
	}
	return t.URI
}

// migrateParams checks that the VM runs here and, when its vTPM references
// another secret than SecretUUID (a domain vtpmm did not define), rewrites the
// destination's live and persistent XML to reference SecretUUID.
func (h *Hypervisor) migrateParams(ctx context.Context, vmUUID string) (*golibvirt.DomainMigrateParameters, error) {
	params := &golibvirt.DomainMigrateParameters{}
	err := h.with(ctx, func(c *golibvirt.Connect) error {
		d, err := lookup(c, vmUUID)
		if err != nil {
			return err
		}
		defer d.Free()
		st, _, err := d.GetState()
		if err != nil {
			return wrapLibvirt(err)
		}
		if state(st) != hypervisor.StateRunning {
			return hypervisor.ErrNotRunning
		}
		doc, err := d.GetXMLDesc(golibvirt.DOMAIN_XML_MIGRATABLE | golibvirt.DOMAIN_XML_SECURE)
		if err != nil {
			return wrapLibvirt(err)
		}
		tpm, err := emulatorTPM(doc)
		if err != nil {
			return err
		}
		if tpm == nil {
			return ErrNoVTPM
		}
		want := hypervisor.SecretUUID(vmUUID)
		if tpm.Encryption == nil || tpm.Encryption.Secret == want {
			return nil
		}
		if doc, err = withSecret(doc, want); err != nil {
			return err
		}
		params.DestXMLSet, params.DestXML = true, doc
		params.PersistXMLSet, params.PersistXML = true, doc
		return nil
	})
	return params, err
}

// precheck refuses early what libvirt would refuse (or detect only late).
func precheck(peer *golibvirt.Connect, vmUUID, secretUUID string) error {
	if d, err := peer.LookupDomainByUUIDString(vmUUID); err == nil {
		d.Free()
		return fmt.Errorf("%w: domain %s is defined there", hypervisor.ErrAlreadyExists, vmUUID)
	} else if !isCode(err, golibvirt.ERR_NO_DOMAIN) {
		return fmt.Errorf("%w: %w", hypervisor.ErrUnreachable, wrapLibvirt(err))
	}
	ok, err := hasSecret(peer, secretUUID)
	if err != nil {
		return fmt.Errorf("%w: %w", hypervisor.ErrUnreachable, err)
	}
	if !ok {
		return fmt.Errorf("%w: no secret with uuid %s on the destination (checked before migrating)", hypervisor.ErrSecretMissing, secretUUID)
	}
	return nil
}

// runMigration runs MigrateToURI3, aborting the job when ctx ends.
func runMigration(ctx context.Context, d *golibvirt.Domain, uri string, params *golibvirt.DomainMigrateParameters, abort func()) error {
	done := make(chan error, 1)
	go func() { done <- d.MigrateToURI3(uri, params, MigrateFlags) }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		abort()
		err := <-done
		if err == nil {
			return nil // completed before the abort took effect
		}
		return fmt.Errorf("%w (%w)", ctx.Err(), err)
	}
}

// abortJob aborts the VM's job (its outgoing migration) through the shared
// connection; errors are left to the migration's own result.
func (h *Hypervisor) abortJob(vmUUID string) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_ = h.with(ctx, func(c *golibvirt.Connect) error {
		d, err := lookup(c, vmUUID)
		if err != nil {
			return err
		}
		defer d.Free()
		return d.AbortJob()
	})
}

// destHasSecret asks the destination whether the secret is defined;
// known is false when it cannot tell.
func destHasSecret(peer *golibvirt.Connect, uri, secretUUID string) (has, known bool) {
	if peer == nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		c, err := connect(ctx, uri)
		if err != nil {
			return false, false
		}
		defer c.Close()
		peer = c
	}
	ok, err := hasSecret(peer, secretUUID)
	return ok, err == nil
}

// classifyMigrate maps a libvirt migration error onto the hypervisor
// sentinels (see docs/libvirt.md for the table). secretOnDest is asked
// only for libvirt's generic late failure.
func classifyMigrate(err error, secretOnDest func() (has, known bool)) error {
	le, ok := libvirtError(err)
	if !ok { // ours already (ErrNoDomain, ErrNotRunning, ErrClosed, ...)
		if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
			return fmt.Errorf("%w: aborted: %w", hypervisor.ErrMigrationFailed, err)
		}
		return err
	}
	msg := wrapLibvirt(err)
	m := le.Message
	switch {
	case le.Code == golibvirt.ERR_HOOK_SCRIPT_FAILED || containsAny(m, "Hook script execution failed"):
		return fmt.Errorf("%w: %w", hypervisor.ErrHookRefused, msg)
	case le.Code == golibvirt.ERR_NO_SECRET || containsAny(m, "Secret not found", "no secret with matching uuid"):
		return fmt.Errorf("%w: %w", hypervisor.ErrSecretMissing, msg)
	case le.Code == golibvirt.ERR_NO_DOMAIN:
		return fmt.Errorf("%w: %w", hypervisor.ErrNoDomain, msg)
	case containsAny(m, "already exists"):
		return fmt.Errorf("%w: %w", hypervisor.ErrAlreadyExists, msg)
	case le.Code == golibvirt.ERR_OPERATION_INVALID && containsAny(m, "not running"):
		return fmt.Errorf("%w: %w", hypervisor.ErrNotRunning, msg)
	case le.Code == golibvirt.ERR_NO_CONNECT || le.Code == golibvirt.ERR_AUTH_FAILED ||
		containsAny(m, "unable to connect to server", "Connection refused", "No route to host",
			"Connection timed out", "Network is unreachable", "Name or service not known", "Cannot recv data",
			"Failed to connect socket"):
		return fmt.Errorf("%w: %w", hypervisor.ErrUnreachable, msg)
	case containsAny(m, "decryption error", "tpm-emulator: Setting the stateblob"):
		return fmt.Errorf("%w: %w", hypervisor.ErrSecretMismatch, msg)
	case containsAny(m, lateFailure, "qemu unexpectedly closed the monitor", "load of migration failed"):
		if has, known := secretOnDest(); known && has {
			return fmt.Errorf("%w: %w", hypervisor.ErrSecretMismatch, msg)
		}
	}
	return fmt.Errorf("%w: %w", hypervisor.ErrMigrationFailed, msg)
}
