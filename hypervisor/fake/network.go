package fake

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/sirupsen/logrus"

	"github.com/vtpmm/vtpmm/hypervisor"
)

// URIScheme prefixes the URI of a fake host's migration target.
const URIScheme = "fake://"

// Network is a set of fake hosts that can migrate VMs to each other. The
// zero value is not usable; call NewNetwork.
type Network struct {
	mu     sync.Mutex
	hosts  map[string]*Host
	down   map[string]bool
	closed bool
}

// NewNetwork returns an empty network.
func NewNetwork() *Network {
	return &Network{hosts: map[string]*Host{}, down: map[string]bool{}}
}

// HostConfig describes one fake host.
type HostConfig struct {
	// Name is the host name (Hypervisor.Name, Target.Name).
	Name string
	// Dir holds the vTPM state of domains that arrive by migration
	// (Dir/vms/UUID/tpm2) and the swtpm logs; created if missing. It must
	// not contain ',' or '=' (swtpm's option syntax).
	Dir string
	// Log receives the host's log messages; nil discards them.
	Log logrus.FieldLogger
}

// AddHost creates a host on the network.
func (n *Network) AddHost(ctx context.Context, cfg HostConfig) (*Host, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("add fake host %q: %w", cfg.Name, err)
	}
	if cfg.Name == "" || strings.ContainsAny(cfg.Name, "/ ") {
		return nil, fmt.Errorf("add fake host %q: %w: name must be non-empty, without '/' or spaces", cfg.Name, ErrBadConfig)
	}
	if cfg.Dir == "" || strings.ContainsAny(cfg.Dir, ",=") {
		return nil, fmt.Errorf("add fake host %q: %w: Dir %q must be set and contain no ',' or '='", cfg.Name, ErrBadConfig, cfg.Dir)
	}
	dir, err := filepath.Abs(cfg.Dir)
	if err != nil {
		return nil, fmt.Errorf("add fake host %q: %w: %v", cfg.Name, ErrBadConfig, err)
	}
	for _, d := range []string{filepath.Join(dir, "vms"), filepath.Join(dir, "log")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("add fake host %q: %w", cfg.Name, err)
		}
	}
	log := cfg.Log
	if log == nil {
		l := logrus.New()
		l.SetOutput(io.Discard)
		log = l
	}
	h := &Host{
		name:    cfg.Name,
		dir:     dir,
		log:     log.WithField("host", cfg.Name),
		net:     n,
		secrets: map[string][]byte{},
		domains: map[string]*domain{},
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.closed {
		return nil, fmt.Errorf("add fake host %q: %w", cfg.Name, ErrClosed)
	}
	if _, ok := n.hosts[cfg.Name]; ok {
		return nil, fmt.Errorf("add fake host %q: %w", cfg.Name, ErrHostExists)
	}
	n.hosts[cfg.Name] = h
	return h, nil
}

// Host returns the host of that name.
func (n *Network) Host(name string) (*Host, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	h, ok := n.hosts[name]
	return h, ok
}

// SetDown marks a host unreachable (down=true) or reachable again. A
// migration to a host that is down fails with hypervisor.ErrUnreachable;
// the host's own VMs keep running.
func (n *Network) SetDown(name string, down bool) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if _, ok := n.hosts[name]; !ok {
		return fmt.Errorf("set fake host %q down=%v: %w: no such host", name, down, ErrBadConfig)
	}
	n.down[name] = down
	return nil
}

// resolve finds a migration target's host.
func (n *Network) resolve(t hypervisor.Target) (*Host, error) {
	name := t.Name
	if t.URI != "" {
		rest, ok := strings.CutPrefix(t.URI, URIScheme)
		if !ok {
			return nil, fmt.Errorf("%w: unsupported URI %q (want %sNAME)", hypervisor.ErrUnreachable, t.URI, URIScheme)
		}
		if name != "" && name != rest {
			return nil, fmt.Errorf("%w: target name %q and URI %q disagree", hypervisor.ErrUnreachable, name, t.URI)
		}
		name = rest
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	h, ok := n.hosts[name]
	switch {
	case !ok:
		return nil, fmt.Errorf("%w: unable to connect to server %q: no such host", hypervisor.ErrUnreachable, name)
	case n.down[name] || n.closed:
		return nil, fmt.Errorf("%w: unable to connect to server %q: host is down", hypervisor.ErrUnreachable, name)
	}
	return h, nil
}

// Close stops every swtpm of every host on the network. The hosts' state
// directories are left in place.
func (n *Network) Close(ctx context.Context) error {
	n.mu.Lock()
	n.closed = true
	hosts := make([]*Host, 0, len(n.hosts))
	for _, h := range n.hosts {
		hosts = append(hosts, h)
	}
	n.mu.Unlock()
	var errs []error
	for _, h := range hosts {
		errs = append(errs, h.Close(ctx))
	}
	return errors.Join(errs...)
}
