package lab

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/vtpmm/vtpmm/migrate"
)

// Helpers for failover on the lab (issue 15, docs/failover.md): the
// standby section of a vtpmd's configuration with the lab's fence agent,
// the domain's definition shared with a standby (as an HA manager's shared
// domain configuration would have it), and what a standby holds.

// StandbyYAML is the standby section of a vtpmd's configuration: replicas
// at most maxLag behind, automatic failover, and the lab's fence agent at
// agent (BuildFenceAgent) as the fence command, '{host}' replaced by the
// host to fence.
func (n *Network) StandbyYAML(agent string, maxLag, fenceTimeout time.Duration) string {
	return fmt.Sprintf(`standby:
  max_lag: %s
  failover: auto
  fence:
    command: [%q, "--lab-dir", %q, "--host", "{host}", "--action", "off"]
    timeout: %s
`, maxLag, agent, n.Dir, fenceTimeout)
}

// DefineFrom defines (shut off) on h the domain vm as src's libvirt has it
// (its persistent XML: same UUID, name, kernel and initramfs, vTPM with
// the same secret's UUID), as a cluster's shared domain configuration
// (Pacemaker's VirtualDomain) has every node know it. No vTPM state is
// copied: a promotion puts the replica's state in place.
func (h *FleetHost) DefineFrom(ctx context.Context, src *FleetHost, vm *VM) error {
	xml, err := os.ReadFile(src.Path("/etc/libvirt/qemu/" + vm.Name + ".xml"))
	if err != nil {
		return err
	}
	p := "/var/lib/libvirt/" + vm.Name + ".xml"
	if err := os.WriteFile(h.Path(p), xml, 0o600); err != nil {
		return err
	}
	if out, _, err := h.Virsh(ctx, "define", p); err != nil {
		return fmt.Errorf("virsh define %s on %s: %v %s", vm.Name, h.Name, err, strings.TrimSpace(out))
	}
	return nil
}

// Replica is this host's standby replica of vm (nil when it holds none).
func (h *FleetHost) Replica(vm *VM) (*migrate.StoredReplica, error) {
	r, err := (&migrate.ReplicaStore{Dir: filepath.Join(h.Vtpmd.DataDir, "replicas")}).Get(vm.UUID)
	if errors.Is(err, migrate.ErrNoReplica) {
		return nil, nil
	}
	return r, err
}

// VTPMStateSHA256 is the SHA-256 of vm's vTPM state file in libvirt's
// swtpm directory on h (as a replica's state_sha256 has it).
func (h *FleetHost) VTPMStateSHA256(vm *VM) ([]byte, error) {
	b, err := os.ReadFile(h.Path(filepath.Join("/var/lib/libvirt/swtpm", vm.UUID, "tpm2", "tpm2-00.permall")))
	if err != nil {
		return nil, err
	}
	s := sha256.Sum256(b)
	return s[:], nil
}

// FailoverLog is one "automatic failover done" line of a vtpmd's log: when
// the standby began (it saw the owner's lease gone) and its phases.
type FailoverLog struct {
	VM         string        `json:"vm"`
	From       string        `json:"from"`
	Generation uint64        `json:"generation"`
	Began      time.Time     `json:"began"`
	Fence      time.Duration `json:"fence"`
	Promote    time.Duration `json:"promote"`
	Start      time.Duration `json:"start"`
	Started    bool          `json:"started"`
}

// AutomaticFailovers returns the automatic failovers in the daemon's log.
func (v *Vtpmd) AutomaticFailovers() ([]FailoverLog, error) {
	b, err := os.ReadFile(v.LogPath)
	if err != nil {
		return nil, err
	}
	var out []FailoverLog
	for _, l := range strings.Split(string(b), "\n") {
		if !strings.Contains(l, `"msg":"automatic failover done"`) {
			continue
		}
		var f FailoverLog
		if err := json.Unmarshal([]byte(l), &f); err != nil {
			return nil, fmt.Errorf("%s's vtpmd log: %w: %s", v.Host.Name, err, l)
		}
		out = append(out, f)
	}
	return out, nil
}

// WaitAutomaticFailovers waits (at most timeout) until the vtpmd logged n
// automatic failovers: the domain may run a moment before the failover
// returns and logs.
func (v *Vtpmd) WaitAutomaticFailovers(n int, timeout time.Duration) ([]FailoverLog, error) {
	deadline := time.Now().Add(timeout)
	for {
		fos, err := v.AutomaticFailovers()
		if err != nil || len(fos) >= n || time.Now().After(deadline) {
			return fos, err
		}
		time.Sleep(200 * time.Millisecond)
	}
}
