package escrow_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"

	"filippo.io/age"

	"github.com/vtpmm/vtpmm/migrate/escrow"
	"github.com/vtpmm/vtpmm/vtpm"
)

// Example: three custodians, any two restore. The source seals a bundle
// from the VM key it holds in memory; at a restore two custodians bring
// their identities.
func Example() {
	var cfg escrow.Config
	cfg.Threshold = 2
	var identities []string
	for _, name := range []string{"alice", "bob", "carol"} {
		id, _ := age.GenerateHybridIdentity() // post-quantum; age.GenerateX25519Identity works too
		identities = append(identities, id.String())
		cfg.Custodians = append(cfg.Custodians, escrow.CustodianConfig{Name: name, Recipients: []string{id.Recipient().String()}})
	}
	policy, err := cfg.Policy(nil)
	if err != nil {
		panic(err)
	}

	// Source: 0 TPM commands; the key store opened the key in memory.
	key, _ := vtpm.NewVMKey(nil)
	defer key.Destroy()
	sealer, _ := escrow.NewSealer(policy, escrow.SealerOptions{})
	bundle, err := sealer.Seal(context.Background(), escrow.Contents{
		VM:         escrow.VM{UUID: "0e2e0e2e-0000-4000-8000-00000000d3e0", Name: "vm42"},
		Generation: 7, SourceHost: "host-a", State: []byte("swtpm state, encrypted under the VM key"),
	}, key)
	if err != nil {
		panic(err)
	}

	// Restore: bob and carol.
	var ids []*escrow.Identity
	for i, name := range []string{"bob", "carol"} {
		id, err := escrow.ParseIdentity(identities[i+1], name+".key", nil)
		if err != nil {
			panic(err)
		}
		ids = append(ids, id)
	}
	opened, err := escrow.Open(context.Background(), bundle, "0e2e0e2e-0000-4000-8000-00000000d3e0", ids, escrow.OpenOptions{})
	if err != nil {
		panic(err)
	}
	defer opened.Destroy()
	fmt.Println(opened.Header.VM.Name, opened.Header.Generation, opened.Used, opened.Key().Equal(key), bytes.HasPrefix(opened.State, []byte("swtpm")))

	// One custodian alone learns nothing, and is told who else is needed.
	_, err = escrow.Open(context.Background(), bundle, "0e2e0e2e-0000-4000-8000-00000000d3e0", ids[:1], escrow.OpenOptions{})
	var se *escrow.SharesError
	fmt.Println(errors.Is(err, escrow.ErrNotEnoughShares), errors.As(err, &se), se.Need, se.Opened, se.Missing)
	// Output:
	// vm42 7 [bob carol] true true
	// true true 2 [bob] [alice carol]
}
