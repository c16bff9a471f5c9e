package registry

import (
	"context"
	"errors"
	"fmt"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Role names of the registry's RBAC.
const (
	// RoleHosts is every host's shared role: read the whole prefix; read
	// and write VM records and standby records (ownership changes are CAS
	// on them).
	RoleHosts = "vtpmm-hosts"
	// HostRolePrefix + HOST is a host's own role: read and write its own
	// host record, liveness key and evacuation plan, and nothing of
	// another host's.
	HostRolePrefix = "vtpmm-host-"
	rootName       = "root"
)

// BootstrapOptions configures Bootstrap.
type BootstrapOptions struct {
	// Admin is the operator's user: its certificate's CN (default "root").
	// It gets etcd's root role: it alone enrols hosts, changes their
	// state, manages users and members and takes snapshots.
	Admin string
	// Hosts get their users and roles (AddHostUser for each).
	Hosts []string
}

// Bootstrap sets up etcd's RBAC for the registry and enables
// authentication, for the operator's tooling. After it, every client is
// the user named by its certificate's CN (client-cert-auth): the root
// user (no password: certificate only) and Admin hold the root role; a
// host's user holds RoleHosts and its own role, so it reaches nothing
// outside the prefix and, inside it, cannot enrol hosts, change a host's
// state, or write another host's records. Idempotent: run it again to add
// hosts. It returns the number of etcd requests it made. It must run as
// root (before authentication is enabled, anyone with a fleet certificate
// can, so bootstrap before handing out host certificates).
func (c *Client) Bootstrap(ctx context.Context, opts BootstrapOptions) (int, error) {
	if opts.Admin == "" {
		opts.Admin = rootName
	}
	if err := validHost(opts.Admin); err != nil {
		return 0, fmt.Errorf("registry bootstrap: admin: %w", err)
	}
	a := &authOps{c: c}
	a.ignore(rpctypes.ErrRoleAlreadyExist)(a.call(ctx, "add role root", func(ctx context.Context) error {
		_, err := c.cli.RoleAdd(ctx, rootName)
		return err
	}))
	for _, u := range unique(rootName, opts.Admin) {
		a.addUser(ctx, u, rootName)
	}
	a.ignore(rpctypes.ErrRoleAlreadyExist)(a.call(ctx, "add role "+RoleHosts, func(ctx context.Context) error {
		_, err := c.cli.RoleAdd(ctx, RoleHosts)
		return err
	}))
	a.grant(ctx, RoleHosts, c.cfg.Prefix, true, clientv3.PermissionType(clientv3.PermRead))
	a.grant(ctx, RoleHosts, c.k.vms(), true, clientv3.PermissionType(clientv3.PermReadWrite))
	a.grant(ctx, RoleHosts, c.k.standbyAll(), true, clientv3.PermissionType(clientv3.PermReadWrite))
	for _, h := range opts.Hosts {
		a.host(ctx, h)
	}
	a.call(ctx, "enable authentication", func(ctx context.Context) error {
		_, err := c.cli.AuthEnable(ctx)
		return err
	})
	return a.n, a.err
}

// AddHostUser gives a host its etcd user and roles (the operator's
// enrolment calls it with Enroll, once per host): 7 requests. It needs the
// root role once authentication is enabled.
func (c *Client) AddHostUser(ctx context.Context, host string) (int, error) {
	a := &authOps{c: c}
	a.host(ctx, host)
	return a.n, a.err
}

// RemoveHostUser deletes a host's user and own role (a retired host; fence
// it first with SetState). Idempotent.
func (c *Client) RemoveHostUser(ctx context.Context, host string) error {
	if err := validHost(host); err != nil {
		return fmt.Errorf("registry: remove host user: %w", err)
	}
	a := &authOps{c: c}
	a.ignore(rpctypes.ErrUserNotFound)(a.call(ctx, "delete user "+host, func(ctx context.Context) error {
		_, err := c.cli.UserDelete(ctx, host)
		return err
	}))
	a.ignore(rpctypes.ErrRoleNotFound)(a.call(ctx, "delete role "+HostRolePrefix+host, func(ctx context.Context) error {
		_, err := c.cli.RoleDelete(ctx, HostRolePrefix+host)
		return err
	}))
	return a.err
}

// authOps runs a sequence of auth requests, counting them and keeping the
// first error (later steps are skipped after one).
type authOps struct {
	c   *Client
	n   int
	err error
}

func (a *authOps) call(ctx context.Context, what string, f func(ctx context.Context) error) error {
	if a.err != nil {
		return nil
	}
	a.n++
	err := a.c.do(ctx, "registry bootstrap: "+what, f)
	if err != nil {
		a.err = err
	}
	return err
}

// ignore forgives one etcd error (an "already exists" of an idempotent step).
func (a *authOps) ignore(target error) func(error) {
	return func(err error) {
		if err != nil && errors.Is(err, target) {
			a.err = nil
		}
	}
}

func (a *authOps) addUser(ctx context.Context, user, role string) {
	a.ignore(rpctypes.ErrUserAlreadyExist)(a.call(ctx, "add user "+user, func(ctx context.Context) error {
		_, err := a.c.cli.UserAddWithOptions(ctx, user, "", &clientv3.UserAddOptions{NoPassword: true})
		return err
	}))
	a.call(ctx, "grant "+role+" to "+user, func(ctx context.Context) error {
		_, err := a.c.cli.UserGrantRole(ctx, user, role)
		return err
	})
}

func (a *authOps) grant(ctx context.Context, role, key string, prefix bool, perm clientv3.PermissionType) {
	end := ""
	if prefix {
		end = clientv3.GetPrefixRangeEnd(key)
	}
	name := "read"
	if perm == clientv3.PermissionType(clientv3.PermReadWrite) {
		name = "readwrite"
	}
	a.call(ctx, fmt.Sprintf("grant %s on %s to %s", name, key, role), func(ctx context.Context) error {
		_, err := a.c.cli.RoleGrantPermission(ctx, role, key, end, perm)
		return err
	})
}

func (a *authOps) host(ctx context.Context, h string) {
	if err := validHost(h); err != nil {
		if a.err == nil {
			a.err = fmt.Errorf("registry bootstrap: %w", err)
		}
		return
	}
	role := HostRolePrefix + h
	a.ignore(rpctypes.ErrRoleAlreadyExist)(a.call(ctx, "add role "+role, func(ctx context.Context) error {
		_, err := a.c.cli.RoleAdd(ctx, role)
		return err
	}))
	rw := clientv3.PermissionType(clientv3.PermReadWrite)
	a.grant(ctx, role, a.c.k.host(h), false, rw)
	a.grant(ctx, role, a.c.k.live(h), false, rw)
	a.grant(ctx, role, a.c.k.plan(h), false, rw)
	a.addUser(ctx, h, RoleHosts)
	a.call(ctx, "grant "+role+" to "+h, func(ctx context.Context) error {
		_, err := a.c.cli.UserGrantRole(ctx, h, role)
		return err
	})
}

func unique(xs ...string) []string {
	var out []string
	seen := map[string]bool{}
	for _, x := range xs {
		if !seen[x] {
			seen[x] = true
			out = append(out, x)
		}
	}
	return out
}
