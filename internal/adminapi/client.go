package adminapi

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
)

// DefaultSocket is vtpmd's default admin socket.
const DefaultSocket = "/run/vtpmm/vtpmd.sock"

// maxStreamLine bounds one line of the migration stream.
const maxStreamLine = 1 << 20

// Client talks to the local vtpmd over its admin socket.
type Client struct {
	socket string
	http   *http.Client
}

// NewClient returns a Client for the admin socket at path socket.
func NewClient(socket string) *Client {
	return &Client{socket: socket, http: &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			c, err := d.DialContext(ctx, "unix", socket)
			if err != nil {
				return nil, &dialError{err: err}
			}
			return c, nil
		},
	}}}
}

// dialError marks a failed connection to the admin socket (ErrUnreachable),
// as opposed to a connection that gave no answer (ErrNoAnswer).
type dialError struct{ err error }

func (e *dialError) Error() string { return e.err.Error() }
func (e *dialError) Unwrap() error { return e.err }

// Socket is the admin socket's path.
func (c *Client) Socket() string { return c.socket }

// do sends a request; an answer of status >= 300 becomes its decoded error.
func (c *Client) do(ctx context.Context, method, path string, body any) (*http.Response, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://vtpmd"+path, rd)
	if err != nil {
		return nil, err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		var de *dialError
		if errors.As(err, &de) && ctx.Err() == nil {
			return nil, fmt.Errorf("%w at %s (is it running? --socket): %w", ErrUnreachable, c.socket, de.err)
		}
		return nil, fmt.Errorf("%w at %s (it runs but is slow or stuck): %w", ErrNoAnswer, c.socket, err)
	}
	if resp.StatusCode >= 300 {
		defer resp.Body.Close()
		var e ErrorResponse
		_ = json.NewDecoder(resp.Body).Decode(&e)
		return nil, fmt.Errorf("vtpmd: %w", e.Err())
	}
	return resp, nil
}

// call sends a request and decodes the answer into out.
func (c *Client) call(ctx context.Context, method, path string, body, out any) error {
	resp, err := c.do(ctx, method, path, body)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("%w: %s %s: %v", ErrProtocol, method, path, err)
	}
	return nil
}

// Migrate asks vtpmd to migrate req.VMs to req.To. progress, if not nil,
// gets every phase as it starts. It returns the end event, and the
// migration's error (MigrateEvent.Err), which errors.Is matches against
// the sentinels of its classes.
func (c *Client) Migrate(ctx context.Context, req MigrateRequest, progress func(MigrateEvent)) (MigrateEvent, error) {
	resp, err := c.do(ctx, http.MethodPost, PathMigrate, req)
	if err != nil {
		return MigrateEvent{}, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, maxStreamLine), maxStreamLine)
	for sc.Scan() {
		var ev MigrateEvent
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			return MigrateEvent{}, fmt.Errorf("migrate: %w: bad progress line: %v", ErrProtocol, err)
		}
		if ev.Done {
			return ev, ev.Err()
		}
		if progress != nil {
			progress(ev)
		}
	}
	return MigrateEvent{}, fmt.Errorf("migrate: %w: vtpmd closed the stream early: %v", ErrProtocol, sc.Err())
}

// VMs lists the VMs this host owns or runs.
func (c *Client) VMs(ctx context.Context) ([]VMInfo, error) {
	var out []VMInfo
	return out, c.call(ctx, http.MethodGet, PathVMs, nil, &out)
}

// VM shows one VM (by name or UUID) with the transactions that touched it.
func (c *Client) VM(ctx context.Context, ref string) (VMInfo, error) {
	var out VMInfo
	return out, c.call(ctx, http.MethodGet, PathVMs+"/"+url.PathEscape(ref), nil, &out)
}

// Rekey asks vtpmd to replace a shut-off VM's key now.
func (c *Client) Rekey(ctx context.Context, ref string) (RekeyInfo, error) {
	var out RekeyInfo
	return out, c.call(ctx, http.MethodPost, PathVMs+"/"+url.PathEscape(ref)+"/rekey", struct{}{}, &out)
}

// Hosts lists this host and its peers, with their reachability.
func (c *Client) Hosts(ctx context.Context) ([]HostInfo, error) {
	var out []HostInfo
	return out, c.call(ctx, http.MethodGet, PathHosts, nil, &out)
}

// Enroll asks vtpmd to enrol host. The error (EnrollInfo.Err) says why it
// was not enrolled.
func (c *Client) Enroll(ctx context.Context, host string) (EnrollInfo, error) {
	return c.EnrollWith(ctx, host, EnrollRequest{})
}

// EnrollWith is Enroll with a request body (HOST's address).
func (c *Client) EnrollWith(ctx context.Context, host string, req EnrollRequest) (EnrollInfo, error) {
	var out EnrollInfo
	if err := c.call(ctx, http.MethodPost, PathHosts+"/"+url.PathEscape(host)+"/enroll", req, &out); err != nil {
		return out, err
	}
	return out, out.Err()
}

// Registry reports how vtpmd reaches the fleet registry.
func (c *Client) Registry(ctx context.Context) (RegistryInfo, error) {
	var out RegistryInfo
	return out, c.call(ctx, http.MethodGet, PathRegistry, nil, &out)
}

// FleetVMs lists the fleet registry's VM records.
func (c *Client) FleetVMs(ctx context.Context) (FleetVMs, error) {
	var out FleetVMs
	return out, c.call(ctx, http.MethodGet, PathFleetVMs, nil, &out)
}

// CreateVM asks vtpmd to create a VM's vTPM.
func (c *Client) CreateVM(ctx context.Context, req CreateVMRequest) (VMInfo, error) {
	var out VMInfo
	return out, c.call(ctx, http.MethodPost, PathVMs, req, &out)
}

// Audit reads the local audit log, filtered by VM and event when not empty.
func (c *Client) Audit(ctx context.Context, vm, event string) (AuditLog, error) {
	q := url.Values{}
	if vm != "" {
		q.Set("vm", vm)
	}
	if event != "" {
		q.Set("event", event)
	}
	var out AuditLog
	return out, c.call(ctx, http.MethodGet, PathAudit+"?"+q.Encode(), nil, &out)
}

// HookPull asks vtpmd to pull a VM's key for an incoming migration.
func (c *Client) HookPull(ctx context.Context, req HookRequest) (HookPullResponse, error) {
	var out HookPullResponse
	return out, c.call(ctx, http.MethodPost, PathHookPull, req, &out)
}

// HookPrepare asks vtpmd to get a VM's vTPM secret ready before it starts.
func (c *Client) HookPrepare(ctx context.Context, req HookRequest) (HookPrepareResponse, error) {
	var out HookPrepareResponse
	return out, c.call(ctx, http.MethodPost, PathHookPrepare, req, &out)
}

// HookReleased tells vtpmd that the hypervisor let go of a VM here.
func (c *Client) HookReleased(ctx context.Context, req HookRequest) error {
	var out HookReleasedResponse
	return c.call(ctx, http.MethodPost, PathHookReleased, req, &out)
}
