package registry_test

import (
	"errors"
	"fmt"
	"testing"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/vtpmm/vtpmm/migrate/registry"
)

// TestReadRetriesElections: the errors etcd answers while its members
// elect a leader are the ones a read repeats; nothing else is.
func TestReadRetriesElections(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		want bool
	}{
		{"leader changed (client)", rpctypes.ErrLeaderChanged, true},
		{"leader changed (gRPC)", rpctypes.ErrGRPCLeaderChanged, true},
		{"no leader (gRPC)", rpctypes.ErrGRPCNoLeader, true},
		{"leader changed (status)", status.Error(codes.Unavailable, "etcdserver: leader changed"), true},
		{"no leader (client)", rpctypes.ErrNoLeader, true},
		{"permission denied", rpctypes.ErrPermissionDenied, false},
		{"unavailable", status.Error(codes.Unavailable, "connection refused"), false},
		{"other", errors.New("etcdserver: leader changed soon"), false},
		{"wrapped other", fmt.Errorf("x: %w", rpctypes.ErrGRPCTooManyOps), false},
	} {
		if got := registry.ElectingForTest(tc.err); got != tc.want {
			t.Errorf("%s: electing(%v) = %v, want %v", tc.name, tc.err, got, tc.want)
		}
	}
}
