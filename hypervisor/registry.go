package hypervisor

import (
	"context"
	"fmt"
	"io"
	"net/url"
	"slices"
	"strings"

	"github.com/sirupsen/logrus"
)

// Config is what an Opener gets.
type Config struct {
	// URI is the hypervisor URI, e.g. qemu:///system.
	URI string
	// Name is this host's name (Hypervisor.Name, migration targets).
	Name string
	// Log receives the hypervisor's logs; nil discards them.
	Log logrus.FieldLogger
}

// Opener connects to the hypervisor at cfg.URI. The Hypervisor it returns
// may implement io.Closer; whoever opened it closes it.
type Opener func(ctx context.Context, cfg Config) (Hypervisor, error)

// Registry maps hypervisor URI schemes to Openers. The composition root
// fills it (cmd/vtpmd registers hypervisor/libvirt, which needs cgo);
// nothing registers itself and there is no global registry, so the core
// and the CLI build without cgo.
type Registry struct {
	openers map[string]Opener
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry { return &Registry{openers: map[string]Opener{}} }

// Register makes o open URIs of scheme (e.g. "qemu", "qemu+tcp").
func (r *Registry) Register(scheme string, o Opener) { r.openers[scheme] = o }

// Schemes lists the registered schemes, sorted.
func (r *Registry) Schemes() []string {
	out := make([]string, 0, len(r.openers))
	for s := range r.openers {
		out = append(out, s)
	}
	slices.Sort(out)
	return out
}

// Open opens cfg.URI with the Opener of its scheme. An empty URI is None.
// A nil Registry knows no scheme.
func (r *Registry) Open(ctx context.Context, cfg Config) (Hypervisor, error) {
	if cfg.URI == "" {
		return None{}, nil
	}
	u, err := url.Parse(cfg.URI)
	if err != nil || u.Scheme == "" {
		return nil, fmt.Errorf("hypervisor %q: %w: not a URI", cfg.URI, ErrUnknownScheme)
	}
	var o Opener
	if r != nil {
		o = r.openers[u.Scheme]
	}
	if o == nil {
		var known []string
		if r != nil {
			known = r.Schemes()
		}
		return nil, fmt.Errorf("hypervisor %q: %w %q (this build knows: %s)", cfg.URI, ErrUnknownScheme, u.Scheme, orNone(strings.Join(known, ", ")))
	}
	return o(ctx, cfg)
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}

// Close closes h if it is an io.Closer.
func Close(h Hypervisor) error {
	if c, ok := h.(io.Closer); ok {
		return c.Close()
	}
	return nil
}
