package lab

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
)

// FenceAgentPackage is the import path of the lab's fence agent
// (cmd/fence_lab: 'fence_lab --lab-dir DIR --host H --action off|status',
// Pacemaker's fence-agent convention; exit 0 = fenced).
const FenceAgentPackage = "github.com/vtpmm/vtpmm/test/lab/cmd/fence_lab"

// BuildFenceAgent builds cmd/fence_lab into dir and returns its path.
func BuildFenceAgent(ctx context.Context, dir string) (string, error) {
	root, err := ModuleRoot()
	if err != nil {
		return "", err
	}
	out := filepath.Join(dir, "fence_lab")
	build := exec.CommandContext(ctx, "go", "build", "-o", out, FenceAgentPackage)
	build.Dir = root
	if b, err := build.CombinedOutput(); err != nil {
		return "", fmt.Errorf("build fence_lab: %v\n%s", err, b)
	}
	return out, nil
}

// FenceCommand is the command line that fences host h with the lab's
// fence agent at agent (for a vtpmd's or a test's fence configuration).
func (n *Network) FenceCommand(agent string, h *Host) []string {
	return []string{agent, "--lab-dir", n.Dir, "--host", h.Name, "--action", "off"}
}
