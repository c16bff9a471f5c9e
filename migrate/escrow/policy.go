package escrow

import (
	"fmt"
	"os"
	"regexp"

	"filippo.io/age/plugin"
)

// maxRecipientsPerCustodian bounds one custodian's recipients (e.g. a
// hardware token and a paper backup key).
const maxRecipientsPerCustodian = 16

var custodianNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}$`)

// Custodian is a person or role holding one share offline. Their share is
// encrypted to every one of their recipients, so any one of their keys
// opens it.
type Custodian struct {
	Name       string
	Recipients []Recipient
}

// Policy says who holds the shares of a bundle key and how many of them
// must come together to restore: any Threshold of the Custodians (k of
// n). With k = 1 each custodian alone can restore (the bundle key is
// encrypted to each of them, no splitting).
type Policy struct {
	threshold  int
	custodians []Custodian
}

// NewPolicy checks and returns a k-of-n policy: 1 <= k <= n <= 255,
// custodian names unique and well formed, every custodian with 1..16
// recipients and none of them shared with another custodian (a shared key
// would let one person hold two shares), and no custodian mixing
// post-quantum and classic native recipients (age refuses that: it would
// make the share only as strong as the classic key).
func NewPolicy(k int, custodians []Custodian) (*Policy, error) {
	n := len(custodians)
	if n == 0 || n > maxShares || k < 1 || k > n {
		return nil, fmt.Errorf("%w: threshold %d of %d custodians (want 1 <= k <= n <= %d)", ErrBadPolicy, k, n, maxShares)
	}
	names := map[string]bool{}
	owner := map[string]string{}
	out := make([]Custodian, n)
	for i, c := range custodians {
		if !custodianNameRE.MatchString(c.Name) {
			return nil, fmt.Errorf("%w: custodian %d: name %q (want 1-64 of A-Z a-z 0-9 _ . @ + -)", ErrBadPolicy, i+1, c.Name)
		}
		if names[c.Name] {
			return nil, fmt.Errorf("%w: custodian %s is listed twice", ErrBadPolicy, c.Name)
		}
		names[c.Name] = true
		if len(c.Recipients) == 0 || len(c.Recipients) > maxRecipientsPerCustodian {
			return nil, fmt.Errorf("%w: custodian %s has %d recipients (want 1..%d)", ErrBadPolicy, c.Name, len(c.Recipients), maxRecipientsPerCustodian)
		}
		var pq, classic int
		for _, r := range c.Recipients {
			if r.r == nil {
				return nil, fmt.Errorf("%w: custodian %s: a recipient was not made by ParseRecipient", ErrBadPolicy, c.Name)
			}
			fp := r.Fingerprint()
			if o, dup := owner[fp]; dup {
				return nil, fmt.Errorf("%w: recipient %s of custodian %s is also a recipient of %s: one key would open two shares", ErrBadPolicy, short(r.enc), c.Name, o)
			}
			owner[fp] = c.Name
			switch {
			case r.kind.PostQuantum():
				pq++
			case r.kind.Plugin() == "":
				classic++
			}
		}
		if pq > 0 && classic > 0 {
			return nil, fmt.Errorf("%w: custodian %s mixes post-quantum and classic recipients; age refuses that (the share would be only as strong as the classic key): give them only post-quantum or only classic keys", ErrBadPolicy, c.Name)
		}
		out[i] = Custodian{Name: c.Name, Recipients: append([]Recipient(nil), c.Recipients...)}
	}
	return &Policy{threshold: k, custodians: out}, nil
}

// Threshold returns k.
func (p *Policy) Threshold() int { return p.threshold }

// Custodians returns a copy of the custodian list, in share order.
func (p *Policy) Custodians() []Custodian { return append([]Custodian(nil), p.custodians...) }

// PostQuantumSafe reports whether an adversary who can break every classic
// key (X25519, P-256, plugins of unknown kind) still cannot gather k
// shares: fewer than k custodians have a classic recipient.
func (p *Policy) PostQuantumSafe() bool {
	exposed := 0
	for _, c := range p.custodians {
		for _, r := range c.Recipients {
			if !r.kind.PostQuantum() {
				exposed++
				break
			}
		}
	}
	return exposed < p.threshold
}

// Config is the escrow part of vtpmd's configuration (YAML or JSON):
//
//	escrow:
//	  threshold: 2
//	  custodians:
//	    - name: alice
//	      recipients: [age1pq1…]
//	    - name: bob
//	      recipients_file: /etc/vtpmm/escrow/bob.txt
type Config struct {
	Threshold  int               `yaml:"threshold" json:"threshold"`
	Custodians []CustodianConfig `yaml:"custodians" json:"custodians"`
}

// CustodianConfig is one custodian in Config: inline recipients, a
// recipients file, or both.
type CustodianConfig struct {
	Name           string   `yaml:"name" json:"name"`
	Recipients     []string `yaml:"recipients,omitempty" json:"recipients,omitempty"`
	RecipientsFile string   `yaml:"recipients_file,omitempty" json:"recipients_file,omitempty"`
}

// Policy parses every recipient and builds the policy. ui handles plugin
// prompts when a bundle is sealed (nil: NonInteractiveUI). Errors name the
// custodian and the recipient.
func (c Config) Policy(ui *plugin.ClientUI) (*Policy, error) {
	var cs []Custodian
	for i, cc := range c.Custodians {
		name := cc.Name
		if name == "" {
			name = fmt.Sprintf("#%d", i+1)
		}
		var rs []Recipient
		for j, s := range cc.Recipients {
			r, err := ParseRecipient(s, ui)
			if err != nil {
				return nil, fmt.Errorf("escrow: custodian %s, recipient %d: %w", name, j+1, err)
			}
			rs = append(rs, r)
		}
		if cc.RecipientsFile != "" {
			f, err := os.Open(cc.RecipientsFile)
			if err != nil {
				return nil, fmt.Errorf("escrow: custodian %s: %w: %w", name, ErrBadRecipient, err)
			}
			more, err := ParseRecipientsFile(cc.RecipientsFile, f, ui)
			f.Close()
			if err != nil {
				return nil, fmt.Errorf("escrow: custodian %s: %w", name, err)
			}
			rs = append(rs, more...)
		}
		cs = append(cs, Custodian{Name: cc.Name, Recipients: rs})
	}
	p, err := NewPolicy(c.Threshold, cs)
	if err != nil {
		return nil, fmt.Errorf("escrow: %w", err)
	}
	return p, nil
}
