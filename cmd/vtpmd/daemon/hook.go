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
	"github.com/vtpmm/vtpmm/vtpm"
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
//     nothing, if its "migrate begin" came first here and its source
//     confirms the job (AdmitIncoming); a start from a PENDING key, or
//     while a transaction holds the VM, is refused (403). So is a VM whose
//     key this host does not hold: it would otherwise start without, or
//     with a stale, vTPM key.
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
	// A PENDING key serves only the incoming migration whose "migrate
	// begin" pulled it here, as its source confirms; never a cold start
	// (model F1; migrate/incoming.go).
	if tx, ok, err := d.node.AdmitIncoming(ctx, req.UUID); err != nil {
		log.WithError(err).Warn("hook: start from a PENDING key refused")
		adminapi.WriteError(w, http.StatusForbidden, err)
		return
	} else if ok {
		adminapi.WriteJSON(w, http.StatusOK, adminapi.HookPrepareResponse{Status: "incoming migration", TxID: tx.ID})
		return
	}
	d.rekeyMu.Lock()
	defer d.rekeyMu.Unlock()
	gen, err := d.node.DefineSecret(ctx, req.UUID)
	if errors.Is(err, vtpm.ErrKeyNotFound) {
		err = d.notKeyHeld(ctx, req.Name, req.UUID)
		log.WithError(err).Warn("hook: start refused")
		adminapi.WriteError(w, http.StatusForbidden, err)
		return
	}
	if errors.Is(err, migrate.ErrNotOwner) {
		// The fleet registry disagrees (CheckStart says why and which
		// rule); a stale copy is cleaned by the next ownership sync, once
		// its owner confirms.
		log.WithError(err).Warn("hook: start refused")
		d.requestSync()
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
	d.rotateStopped(req.UUID) // after a stop here (after a migration away, it holds no key)
	adminapi.WriteJSON(w, http.StatusAccepted, adminapi.HookReleasedResponse{Status: "settling"})
}

// peerNames lists the peers, sorted: the configured ones and, with a
// fleet registry, every registered host.
func (d *Daemon) peerNames() []string {
	seen := map[string]bool{}
	out := make([]string, 0, len(d.cfg.Peers))
	for h := range d.cfg.Peers {
		seen[h] = true
		out = append(out, h)
	}
	if d.fleet != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		for _, h := range d.fleet.names(ctx, d.cfg.HostID) {
			if !seen[h] {
				out = append(out, h)
			}
		}
	}
	sort.Strings(out)
	return out
}
