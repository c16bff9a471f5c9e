package adminapi

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/http"

	"github.com/vtpmm/vtpmm/internal/errclass"
)

// PathEvacuate is POST EvacuateRequest -> a stream of NDJSON lines: the
// evacuation's events (package migrate/evacuate's Event, docs/evacuation.md),
// then one EvacuateEnd.
const PathEvacuate = "/v1/evacuate"

// PathEvacuateStop is POST {} -> EvacuateStopped: stop the evacuations
// this vtpmd runs, gracefully (vtpmctl's Ctrl-C): each still sends its
// report and end on its own stream.
const PathEvacuateStop = "/v1/evacuate/stop"

// EvacuateStopped answers PathEvacuateStop.
type EvacuateStopped struct {
	Stopped int `json:"stopped"`
}

// StopEvacuations asks vtpmd to stop its evacuations gracefully.
func (c *Client) StopEvacuations(ctx context.Context) (int, error) {
	var out EvacuateStopped
	err := c.call(ctx, http.MethodPost, PathEvacuateStop, struct{}{}, &out)
	return out.Stopped, err
}

// EvacuateRequest is POST PathEvacuate: 'vtpmctl evacuate HOST' (HOST is
// the vtpmd asked: an evacuation runs on its source).
type EvacuateRequest struct {
	Host     string   `json:"host"`
	To       []string `json:"to,omitempty"`
	Parallel int      `json:"parallel,omitempty"`
	// Headroom is the memory kept free on every destination, in bytes
	// (0: the default, 512 MiB).
	Headroom uint64 `json:"headroom,omitempty"`
	DryRun   bool   `json:"dry_run,omitempty"`
}

// EvacuateEnd is the last line of the PathEvacuate stream.
type EvacuateEnd struct {
	Done bool `json:"done"`
	// ExitCode is vtpmctl's exit code (evacuate.ExitCode of the run).
	ExitCode int    `json:"exit_code"`
	Error    string `json:"error,omitempty"`
	// Code and Reasons classify Error (errclass).
	Code    errclass.Code `json:"code,omitempty"`
	Reasons []string      `json:"reasons,omitempty"`
}

// Err decodes the end's error (nil when the evacuation ran).
func (e EvacuateEnd) Err() error {
	if e.Error == "" {
		return nil
	}
	return errclass.Decode(e.Error, e.Code, e.Reasons)
}

// Evacuate asks vtpmd to evacuate its host. event gets every event line as
// it arrives (raw JSON; evacuate.Event decodes it). Cancelling ctx closes
// the request, which vtpmd takes as Ctrl-C: no new migration starts, those
// in flight finish and commit. It returns the end line.
func (c *Client) Evacuate(ctx context.Context, req EvacuateRequest, event func(line []byte) error) (EvacuateEnd, error) {
	resp, err := c.do(ctx, http.MethodPost, PathEvacuate, req)
	if err != nil {
		return EvacuateEnd{}, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, maxStreamLine), 16*maxStreamLine)
	for sc.Scan() {
		var end EvacuateEnd
		if err := json.Unmarshal(sc.Bytes(), &end); err != nil {
			return EvacuateEnd{}, fmt.Errorf("evacuate: %w: bad line: %v", ErrProtocol, err)
		}
		if end.Done {
			return end, nil
		}
		if event != nil {
			if err := event(sc.Bytes()); err != nil {
				return EvacuateEnd{}, fmt.Errorf("evacuate: %w", err)
			}
		}
	}
	if err := ctx.Err(); err != nil {
		return EvacuateEnd{}, fmt.Errorf("evacuate: stream closed: %w", err)
	}
	return EvacuateEnd{}, fmt.Errorf("evacuate: %w: vtpmd closed the stream early: %v", ErrProtocol, sc.Err())
}
