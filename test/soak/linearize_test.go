package soak

import (
	"testing"
	"time"

	"github.com/anishathalye/porcupine"

	"github.com/vtpmm/vtpmm/test/fleet"
)

// TestRegModel: the register model accepts what the protocol allows and
// refuses what it does not (the linearizability check can fail).
func TestRegModel(t *testing.T) {
	hosts := []string{"a", "b", "c"}
	read := func(owner string, gen uint64, call, ret int64) porcupine.Operation {
		return porcupine.Operation{Input: regInput{VM: "v", Read: true}, Output: regOutput{State: regState{owner, gen}}, Call: call, Return: ret}
	}
	move := func(from, to string, known bool, call, ret int64) porcupine.Operation {
		return porcupine.Operation{Input: regInput{VM: "v", From: from, To: to}, Output: regOutput{Known: known}, Call: call, Return: ret}
	}
	for _, tc := range []struct {
		name string
		ops  []porcupine.Operation
		want porcupine.CheckResult
	}{
		{"a committed move", []porcupine.Operation{read("a", 1, 0, 1), move("a", "b", true, 2, 3), read("b", 2, 4, 5)}, porcupine.Ok},
		{"a failed move that committed later", []porcupine.Operation{move("a", "b", false, 0, 100), read("a", 1, 2, 3), read("b", 2, 4, 5)}, porcupine.Ok},
		{"a failed move that never committed", []porcupine.Operation{move("a", "b", false, 0, 100), read("a", 1, 4, 5)}, porcupine.Ok},
		{"an evacuation's move to anywhere", []porcupine.Operation{move("a", "", false, 0, 100), read("c", 2, 4, 5)}, porcupine.Ok},
		{"a committed move not in the registry", []porcupine.Operation{move("a", "b", true, 0, 1), read("a", 1, 2, 3)}, porcupine.Illegal},
		{"an owner nobody moved to", []porcupine.Operation{move("a", "b", false, 0, 100), read("c", 2, 2, 3)}, porcupine.Illegal},
		{"a generation skipped", []porcupine.Operation{move("a", "b", true, 0, 1), read("b", 3, 2, 3)}, porcupine.Illegal},
		{"a record going back", []porcupine.Operation{move("a", "b", true, 0, 1), read("b", 2, 2, 3), read("a", 1, 4, 5)}, porcupine.Illegal},
		{"two committed moves from one owner at once", []porcupine.Operation{move("a", "b", true, 0, 2), move("a", "c", true, 1, 3)}, porcupine.Illegal},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := porcupine.CheckOperationsTimeout(regModel(hosts, "a"), tc.ops, 0); got != tc.want {
				t.Errorf("got %s, want %s", got, tc.want)
			}
		})
	}
}

// TestMayFailOverCoversUnsettledMoves (soak seed 9009): a plain
// migration a -> c whose key settles after its op returned, then a fault
// after which c's VM fails over to b by itself. The last read showed a,
// so the moves a fault may cause must be recorded from c too, or the
// registry's c -> b cannot be explained.
func TestMayFailOverCoversUnsettledMoves(t *testing.T) {
	s := &Schedule{cfg: Config{Failover: true}, regOwner: map[string]string{"v": "a"}, down: map[string]bool{},
		lin: &linHistory{start: time.Now()}, vms: []soakVM{{VM: fleet.VM{UUID: "v"}}}}
	s.lin.add(regInput{VM: "v", Read: true}, regOutput{State: regState{"a", 1}}, 0, 1)
	s.lin.add(regInput{VM: "v", From: "a", To: "c"}, regOutput{}, 2, 3) // unknown: settles later
	s.mayFailOver(Step{Kind: "failover"})
	ret := s.lin.now() + 10
	s.lin.add(regInput{VM: "v", Read: true}, regOutput{State: regState{"b", 3}}, ret, ret+1)
	ops := append([]porcupine.Operation(nil), s.lin.ops...)
	for i := range ops {
		if ops[i].Return == unknownReturn {
			ops[i].Return = ret + 2
		}
	}
	if got := porcupine.CheckOperationsTimeout(regModel([]string{"a", "b", "c"}, "a"), ops, 0); got != porcupine.Ok {
		t.Fatalf("c -> b after an unsettled a -> c and a fault: %s, want ok", got)
	}
}
