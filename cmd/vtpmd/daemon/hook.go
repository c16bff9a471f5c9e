package daemon

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sort"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/internal/ids"
	"github.com/vtpmm/vtpmm/internal/strictjson"
	"github.com/vtpmm/vtpmm/migrate"
)

// Hook mode: libvirt's qemu hook (vtpmctl hook qemu) reaches vtpmd here.
//
//   - POST /v1/hook/pull, on the destination at "migrate begin": pull the
//     VM's key from its owner now, before libvirt reads the vTPM secret.
//     Synchronous: the hook's exit status, and so the migration, depend on
//     it. A refusal answers 403 with the owner's reason (the attestation
//     rule), which the hook prints for libvirt to put into virsh's error.
//   - POST /v1/hook/prepare, at "prepare begin" (before libvirt starts the
//     vTPM, on a cold start or an incoming migration): define the VM's
//     secret just in time from the vault when this host owns the key, so a
//     plain 'virsh start' works after a reboot (libvirt forgets ephemeral
//     secrets when it restarts). An incoming migration's PENDING key needs
//     nothing. A VM whose key this host does not hold is refused (403): it
//     would otherwise start without, or with a stale, vTPM key.
//   - POST /v1/hook/released, at "release end": the hypervisor let go of
//     the VM here. Asynchronous (202): libvirt holds the domain's lock while
//     the hook runs, so vtpmd settles the VM's transaction only after the
//     hook has returned.

// settleDelay is how long after a "release end" vtpmd settles the VM: the
// hook must have returned (and libvirt released the domain's lock) first.
const settleDelay = 500 * time.Millisecond

func decodeHook(w http.ResponseWriter, r *http.Request) (adminapi.HookRequest, bool) {
	var req adminapi.HookRequest
	if err := strictjson.DecodeReader(r.Body, &req, 1<<16); err != nil || !ids.IsUUID(req.UUID) {
		adminapi.WriteError(w, http.StatusBadRequest, fmt.Errorf("want {\"uuid\": \"VM UUID\", \"name\": \"...\"}"))
		return req, false
	}
	return req, true
}

func (d *Daemon) handleHookPull(w http.ResponseWriter, r *http.Request) {
	req, ok := decodeHook(w, r)
	if !ok {
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), adminapi.HookTimeout)
	defer cancel()
	t0 := time.Now()
	log := d.log.WithFields(logrus.Fields{"vm": req.UUID, "name": req.Name})
	resp, err := d.node.RequestPull(ctx, []string{req.UUID}, d.peerNames())
	if err != nil {
		log.WithError(err).Warn("hook: incoming migration refused")
		adminapi.WriteError(w, http.StatusForbidden, err)
		return
	}
	took := time.Since(t0)
	log.WithFields(logrus.Fields{"tx": resp.TxID, "owner": resp.Owner, "took": took}).Info("hook: key pulled for an incoming migration")
	adminapi.WriteJSON(w, http.StatusOK, adminapi.HookPullResponse{TxID: resp.TxID, Owner: resp.Owner, Warm: resp.Warm, Took: took.Round(time.Millisecond).String()})
}

func (d *Daemon) handleHookPrepare(w http.ResponseWriter, r *http.Request) {
	req, ok := decodeHook(w, r)
	if !ok {
		return
	}
	ctx := r.Context()
	log := d.log.WithFields(logrus.Fields{"vm": req.UUID, "name": req.Name})
	if tx, ok := d.node.Incoming(req.UUID); ok {
		adminapi.WriteJSON(w, http.StatusOK, adminapi.HookPrepareResponse{Status: "incoming migration", TxID: tx.ID})
		return
	}
	gen, err := d.node.DefineSecret(ctx, req.UUID)
	if errors.Is(err, migrate.ErrNotOwner) {
		err = fmt.Errorf("%w: VM %s (%s): %s holds no key for its vTPM; start it on the host that owns it "+
			"('vtpmctl vm show %s' there) or move it here with 'vtpmctl migrate'", migrate.ErrNotOwner, req.Name, req.UUID, d.cfg.HostID, req.Name)
		log.WithError(err).Warn("hook: start refused")
		adminapi.WriteError(w, http.StatusForbidden, err)
		return
	}
	if err != nil {
		adminapi.WriteError(w, http.StatusInternalServerError, err)
		return
	}
	log.WithField("generation", gen).Info("hook: vTPM secret defined for a start")
	adminapi.WriteJSON(w, http.StatusOK, adminapi.HookPrepareResponse{Status: "secret defined", Generation: gen})
}

func (d *Daemon) handleHookReleased(w http.ResponseWriter, r *http.Request) {
	req, ok := decodeHook(w, r)
	if !ok {
		return
	}
	d.settle(req.UUID, "hook release end")
	adminapi.WriteJSON(w, http.StatusAccepted, adminapi.HookReleasedResponse{Status: "settling"})
}

// peerNames lists the configured peers, sorted.
func (d *Daemon) peerNames() []string {
	out := make([]string, 0, len(d.cfg.Peers))
	for h := range d.cfg.Peers {
		out = append(out, h)
	}
	sort.Strings(out)
	return out
}
