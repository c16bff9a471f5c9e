//go:build e2e

package e2e_test

import (
	"context"
	"fmt"
	"os"
	"sync"
	"testing"

	"github.com/vtpmm/vtpmm/test/e2e"
)

// The real vtpmd and vtpmctl are built once per test binary, into toolsDir.
var (
	toolsDir  string
	toolsOnce sync.Once
	tools     e2e.Tools
	toolsErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if toolsDir != "" {
		_ = os.RemoveAll(toolsDir)
	}
	os.Exit(code)
}

// sharedTools builds vtpmd and vtpmctl (once per test binary).
func sharedTools(ctx context.Context, t *testing.T) e2e.Tools {
	t.Helper()
	toolsOnce.Do(func() {
		if toolsDir, toolsErr = os.MkdirTemp("/tmp", "vtpmm-e2e-bin-"); toolsErr != nil {
			return
		}
		tools, toolsErr = e2e.BuildTools(ctx, toolsDir)
	})
	if toolsErr != nil {
		t.Fatal(fmt.Errorf("vtpmd/vtpmctl: %w", toolsErr))
	}
	return tools
}
