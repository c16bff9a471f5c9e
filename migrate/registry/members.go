package registry

import (
	"context"
	"fmt"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// Members lists the cluster's members (operator tooling; needs root once
// authentication is enabled): one request.
func (c *Client) Members(ctx context.Context) ([]Member, error) {
	var resp *clientv3.MemberListResponse
	err := c.do(ctx, "registry: list members", func(ctx context.Context) (err error) {
		resp, err = c.cli.MemberList(ctx)
		return err
	})
	if err != nil {
		return nil, err
	}
	out := make([]Member, 0, len(resp.Members))
	for _, m := range resp.Members {
		mm := Member{Name: m.Name}
		if len(m.PeerURLs) > 0 {
			mm.PeerURL = m.PeerURLs[0]
		}
		if len(m.ClientURLs) > 0 {
			mm.ClientURL = m.ClientURLs[0]
		}
		out = append(out, mm)
	}
	return out, nil
}

// AddMember announces a new member (a replacement) by its peer URL. Start
// it afterwards with Embedded.ClusterState "existing" and Members set to
// the returned list plus itself. Add one member at a time, after removing
// the one it replaces, so the quorum size never grows while a member is
// missing.
func (c *Client) AddMember(ctx context.Context, m Member) ([]Member, error) {
	if err := checkHTTPS(m.PeerURL); err != nil {
		return nil, fmt.Errorf("registry: add member %s: %w: %w", m.Name, ErrConfig, err)
	}
	err := c.do(ctx, "registry: add member "+m.Name, func(ctx context.Context) error {
		_, err := c.cli.MemberAdd(ctx, []string{m.PeerURL})
		return err
	})
	if err != nil {
		return nil, err
	}
	ms, err := c.Members(ctx)
	if err != nil {
		return nil, err
	}
	out := ms[:0]
	for _, x := range ms {
		if x.Name != "" { // the new member has no name until it starts
			out = append(out, x)
		}
	}
	return out, nil
}

// RemoveMember removes the member named name (a lost host) from the
// cluster.
func (c *Client) RemoveMember(ctx context.Context, name string) error {
	var resp *clientv3.MemberListResponse
	err := c.do(ctx, "registry: remove member "+name, func(ctx context.Context) (err error) {
		resp, err = c.cli.MemberList(ctx)
		return err
	})
	if err != nil {
		return err
	}
	for _, m := range resp.Members {
		if m.Name == name {
			return c.do(ctx, "registry: remove member "+name, func(ctx context.Context) error {
				_, err := c.cli.MemberRemove(ctx, m.ID)
				return err
			})
		}
	}
	return fmt.Errorf("registry: remove member %s: %w", name, ErrNotFound)
}
