package inproc

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"time"

	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/migrate/registry/member"
	"github.com/vtpmm/vtpmm/migrate/registry/operator"
	"github.com/vtpmm/vtpmm/migrate/registry/registrytest"
)

// externalMembers are the members of the external cluster (mode etcd).
var externalMembers = []string{"etcd-1", "etcd-2", "etcd-3"}

// registryTimings are the registry's timers in the fleet: etcd's defaults
// but a shorter liveness lease, so that a killed host is seen not live
// within seconds.
const (
	registryTTL       = 2 * time.Second
	registryOpTimeout = 3 * time.Second
)

func freeURL() (string, error) {
	addr, err := registrytest.FreeAddr()
	if err != nil {
		return "", err
	}
	return "https://" + addr, nil
}

func newMember(name string) (registry.Member, error) {
	peer, err := freeURL()
	if err != nil {
		return registry.Member{}, err
	}
	client, err := freeURL()
	if err != nil {
		return registry.Member{}, err
	}
	return registry.Member{Name: name, PeerURL: peer, ClientURL: client}, nil
}

// startExternal starts the external cluster of mode etcd: three members
// in this process, apart from the hosts, each with its fleet certificate.
func (f *Fleet) startExternal(ctx context.Context) error {
	if f.cfg.Registry != registry.ModeEtcd {
		return nil
	}
	for _, n := range externalMembers {
		m, err := newMember(n)
		if err != nil {
			return err
		}
		f.members = append(f.members, m)
	}
	for _, m := range f.members {
		c, err := registry.OpenClient(ctx, registry.Config{
			Mode: registry.ModeEmbedded, Host: m.Name, NoFollow: true, StartMember: member.Start,
			CAFile: filepath.Join(f.pkiDir, "ca.crt"), CertFile: filepath.Join(f.pkiDir, m.Name+".crt"), KeyFile: filepath.Join(f.pkiDir, m.Name+".key"),
			Embedded: registry.Embedded{DataDir: filepath.Join(f.dir, m.Name), Members: f.members},
		})
		if err != nil {
			return fmt.Errorf("inproc: external registry member %s: %w", m.Name, err)
		}
		f.external = append(f.external, c)
	}
	return nil
}

// configureRegistry writes every host's registry section: embedded (a
// member per host, named after it) or etcd (the external cluster).
func (f *Fleet) configureRegistry() {
	if f.cfg.Registry == registry.ModeEmbedded {
		f.members = nil
		for _, name := range f.order {
			f.members = append(f.members, f.hosts[name].member)
		}
	}
	for _, name := range f.order {
		h := f.hosts[name]
		ttl := registryTTL
		if f.cfg.RegistryTTL > 0 {
			ttl = f.cfg.RegistryTTL
		}
		rc := registry.Config{Mode: f.cfg.Registry, TTL: ttl, OpTimeout: registryOpTimeout}
		if f.cfg.Registry == registry.ModeEmbedded {
			rc.Embedded = registry.Embedded{Members: f.members}
		} else {
			for _, m := range f.members {
				rc.Endpoints = append(rc.Endpoints, m.ClientURL)
			}
		}
		h.cfg.Registry = rc
	}
}

// endpoints are the registry's client URLs.
func (f *Fleet) endpoints() []string {
	var eps []string
	for _, m := range f.members {
		eps = append(eps, m.ClientURL)
	}
	return eps
}

// Operator returns the operator's registry client (etcd's root user; nil
// in registry mode none).
func (f *Fleet) Operator() *registry.Client { return f.op }

// RegistryMode is the fleet's registry mode.
func (f *Fleet) RegistryMode() string { return string(f.cfg.Registry) }

// OpenOperator opens a registry client with the operator's certificate.
func (f *Fleet) OpenOperator(ctx context.Context) (*registry.Client, error) {
	return registry.OpenClient(ctx, registry.Config{
		Mode: registry.ModeEtcd, Host: "root", Endpoints: f.endpoints(), NoFollow: true, OpTimeout: registryOpTimeout,
		CAFile: f.pkiDir + "/ca.crt", CertFile: f.pkiDir + "/root.crt", KeyFile: f.pkiDir + "/root.key",
	})
}

// enrolOnce does what the operator does once the daemons run: 'vtpmctl
// registry bootstrap' (RBAC: every host confined to vtpmm's prefix) and
// 'vtpmctl host enroll HOST' once per host, through host-a's vtpmd (the
// EK chain and activation check) and the registry (the record every host
// trusts): N enrolments for N hosts, not N*(N-1).
func (f *Fleet) enrolOnce(ctx context.Context) error {
	var err error
	if f.op, err = f.OpenOperator(ctx); err != nil {
		return err
	}
	deadline := time.Now().Add(time.Minute)
	for {
		_, err = f.op.Bootstrap(ctx, registry.BootstrapOptions{})
		if err == nil || !errors.Is(err, registry.ErrNoQuorum) || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err != nil {
		return fmt.Errorf("inproc: registry bootstrap: %w", err)
	}
	f.Enrolments = map[string]operator.EnrollReport{}
	via := f.hosts[f.order[0]].admin
	for i, name := range f.order {
		if f.cfg.EnrollLast && i == len(f.order)-1 {
			break
		}
		rep, err := operator.Enroll(ctx, f.op, via, name, operator.EnrollOptions{})
		if err != nil {
			return fmt.Errorf("inproc: enrol %s: %w", name, err)
		}
		f.Enrolments[name] = rep
	}
	return nil
}

// EnrollVia enrols host once through via's vtpmd, as 'vtpmctl host enroll
// HOST' on via does.
func (f *Fleet) EnrollVia(ctx context.Context, via *adminapi.Client, host string) (operator.EnrollReport, error) {
	return operator.Enroll(ctx, f.op, via, host, operator.EnrollOptions{})
}

// PKIDir is the directory of the fleet's CA and certificates (the hosts',
// the operator's "root", and the external members').
func (f *Fleet) PKIDir() string { return f.pkiDir }
