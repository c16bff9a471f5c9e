package libvirt

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"

	"github.com/sirupsen/logrus"
	golibvirt "libvirt.org/go/libvirt"
	"libvirt.org/go/libvirtxml"

	"github.com/vtpmm/vtpmm/hypervisor"
	"github.com/vtpmm/vtpmm/internal/ids"
)

var _ hypervisor.Hypervisor = (*Hypervisor)(nil)

// Config configures a Hypervisor.
type Config struct {
	// URI is the libvirt URI of this host, e.g. "qemu:///system",
	// "qemu:///system?socket=/path/libvirt-sock" or
	// "qemu+tcp://10.251.0.1/system".
	URI string
	// Name is this host's name (hypervisor.Target.Name).
	Name string
	// PeerURI maps a migration target to the URI this process uses to
	// reach the destination's libvirtd for the pre-migration checks. nil
	// means the target's URI itself (the URI the source libvirtd connects
	// to, peer to peer). Tests whose process cannot reach the destination
	// network map it to the destination's unix socket.
	PeerURI func(dest hypervisor.Target) string
	// Log receives the Hypervisor's logs; nil discards them.
	Log logrus.FieldLogger
}

// Hypervisor is one libvirt host. It implements hypervisor.Hypervisor.
type Hypervisor struct {
	cfg  Config
	log  logrus.FieldLogger
	mu   sync.RWMutex // guards conn against Close
	conn *golibvirt.Connect
}

// Schemes are the hypervisor URI schemes Register hands to libvirt.
func Schemes() []string {
	return []string{"qemu", "qemu+tcp", "qemu+tls", "qemu+ssh", "qemu+unix", "qemu+libssh", "qemu+libssh2", "test"}
}

// Register makes r open libvirt's URI schemes (Schemes) with New. Only the
// composition root (cmd/vtpmd) and the lab call it: this package needs cgo.
func Register(r *hypervisor.Registry) {
	for _, s := range Schemes() {
		r.Register(s, func(ctx context.Context, c hypervisor.Config) (hypervisor.Hypervisor, error) {
			return New(ctx, Config{URI: c.URI, Name: c.Name, Log: c.Log})
		})
	}
}

// New connects to the libvirt daemon at cfg.URI.
func New(ctx context.Context, cfg Config) (*Hypervisor, error) {
	if cfg.URI == "" || cfg.Name == "" {
		return nil, fmt.Errorf("libvirt: new: %w: URI and Name are required", ErrBadConfig)
	}
	log := cfg.Log
	if log == nil {
		l := logrus.New()
		l.SetOutput(io.Discard)
		log = l
	}
	conn, err := connect(ctx, cfg.URI)
	if err != nil {
		return nil, fmt.Errorf("libvirt: connect %s: %w", cfg.URI, err)
	}
	return &Hypervisor{cfg: cfg, log: log.WithField("hypervisor", cfg.Name), conn: conn}, nil
}

// connect opens a libvirt connection, giving up when ctx ends (the
// connection attempt itself then finishes in the background and is closed).
func connect(ctx context.Context, uri string) (*golibvirt.Connect, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	type res struct {
		c   *golibvirt.Connect
		err error
	}
	ch := make(chan res, 1)
	go func() {
		c, err := golibvirt.NewConnect(uri)
		ch <- res{c, err}
	}()
	select {
	case r := <-ch:
		if r.err != nil {
			return nil, fmt.Errorf("%w: %w", hypervisor.ErrUnreachable, wrapLibvirt(r.err))
		}
		return r.c, nil
	case <-ctx.Done():
		go func() {
			if r := <-ch; r.c != nil {
				_, _ = r.c.Close()
			}
		}()
		return nil, fmt.Errorf("%w: %w", hypervisor.ErrUnreachable, ctx.Err())
	}
}

// Close closes the connection. Domains and secrets stay as they are.
func (h *Hypervisor) Close() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.conn == nil {
		return nil
	}
	_, err := h.conn.Close()
	h.conn = nil
	if err != nil {
		return fmt.Errorf("libvirt: close %s: %w", h.cfg.Name, wrapLibvirt(err))
	}
	return nil
}

// Name is the host's name.
func (h *Hypervisor) Name() string { return h.cfg.Name }

// URI is the libvirt URI this Hypervisor is connected to.
func (h *Hypervisor) URI() string { return h.cfg.URI }

// with runs f on the open connection.
func (h *Hypervisor) with(ctx context.Context, f func(c *golibvirt.Connect) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	h.mu.RLock()
	defer h.mu.RUnlock()
	if h.conn == nil {
		return ErrClosed
	}
	return f(h.conn)
}

// withOwn runs f on a libvirt connection of its own, opened for this call
// and closed after it. Calls that wait for the qemu hook run there: a
// domain's start ('prepare begin') and an outgoing migration (the
// destination's 'migrate begin' asks this host's vtpmd). libvirt 9.0's RPC
// client can lose the wakeup of a connection's dispatching thread (the
// "buck" holder: virNetClientIO calls g_main_loop_quit before the holder
// is back in g_main_loop_run); a call queued then is sent only when the
// holder's own call returns. While the holder is a start that waits for
// the hook, and the hook waits for vtpmd, whose handler makes that call,
// nothing moves until the hook times out (docs/field-notes.md). On a
// connection of its own the long call is never the holder of a connection
// vtpmd's handlers use.
func (h *Hypervisor) withOwn(ctx context.Context, f func(c *golibvirt.Connect) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	h.mu.RLock()
	closed := h.conn == nil
	h.mu.RUnlock()
	if closed {
		return ErrClosed
	}
	c, err := connect(ctx, h.cfg.URI)
	if err != nil {
		return err
	}
	defer c.Close()
	return f(c)
}

// SecretUsage is the usage name of a VM's vTPM secret.
func SecretUsage(vmUUID string) string { return "vtpmm-" + strings.ToLower(vmUUID) }

// DefineSecret defines (or replaces) a VM's vTPM secret: ephemeral and
// private, so libvirt keeps it in memory only and never returns its value.
// A secret that is already defined as DefineSecret defines it (its UUID,
// ephemeral, private, the VM's usage) gets the value in place
// (virSecretSetValue): a start that references it, whose hook may call
// DefineSecret again ('prepare begin'), never finds it missing. Any other
// secret with the VM's UUID or usage is undefined first.
func (h *Hypervisor) DefineSecret(ctx context.Context, vmUUID string, value []byte) error {
	op := fmt.Sprintf("define secret %s on %s", vmUUID, h.cfg.Name)
	if !ids.IsUUID(vmUUID) || len(value) == 0 {
		return fmt.Errorf("%s: %w: canonical UUID and a non-empty value required", op, ErrBadConfig)
	}
	doc, err := (&libvirtxml.Secret{Ephemeral: "yes", Private: "yes", UUID: hypervisor.SecretUUID(vmUUID),
		Description: "vtpmm vTPM key of " + vmUUID,
		Usage:       &libvirtxml.SecretUsage{Type: "vtpm", Name: SecretUsage(vmUUID)}}).Marshal()
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	err = h.with(ctx, func(c *golibvirt.Connect) error {
		if done, err := setSecretInPlace(c, vmUUID, value); err != nil || done {
			return err
		}
		if err := undefineSecrets(c, vmUUID); err != nil {
			return err
		}
		s, err := c.SecretDefineXML(doc, 0)
		if err != nil {
			return wrapLibvirt(err)
		}
		defer s.Free()
		if err := s.SetValue(value, 0); err != nil {
			_ = s.Undefine()
			return wrapLibvirt(err)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	h.log.WithField("vm", vmUUID).Debug("vTPM secret defined")
	return nil
}

// setSecretInPlace sets value as the VM's secret when the secret is defined
// as DefineSecret defines it; done is false when it is not (absent, or
// another definition: persistent or readable secrets are redefined, never
// given a key).
func setSecretInPlace(c *golibvirt.Connect, vmUUID string, value []byte) (done bool, err error) {
	s, err := c.LookupSecretByUUIDString(hypervisor.SecretUUID(vmUUID))
	if isCode(err, golibvirt.ERR_NO_SECRET) {
		return false, nil
	}
	if err != nil {
		return false, wrapLibvirt(err)
	}
	defer s.Free()
	doc, err := s.GetXMLDesc(0)
	if isCode(err, golibvirt.ERR_NO_SECRET) {
		return false, nil
	}
	if err != nil {
		return false, wrapLibvirt(err)
	}
	var def libvirtxml.Secret
	if err := def.Unmarshal(doc); err != nil || def.Ephemeral != "yes" || def.Private != "yes" ||
		def.Usage == nil || def.Usage.Type != "vtpm" || def.Usage.Name != SecretUsage(vmUUID) {
		return false, nil
	}
	err = s.SetValue(value, 0)
	if isCode(err, golibvirt.ERR_NO_SECRET) {
		return false, nil // undefined meanwhile: define it
	}
	if err != nil {
		return false, wrapLibvirt(err)
	}
	return true, nil
}

// undefineSecrets removes the VM's secret by UUID and any secret holding
// its usage name under another UUID.
func undefineSecrets(c *golibvirt.Connect, vmUUID string) error {
	for _, look := range []func() (*golibvirt.Secret, error){
		func() (*golibvirt.Secret, error) { return c.LookupSecretByUUIDString(hypervisor.SecretUUID(vmUUID)) },
		func() (*golibvirt.Secret, error) {
			return c.LookupSecretByUsage(golibvirt.SECRET_USAGE_TYPE_VTPM, SecretUsage(vmUUID))
		},
	} {
		s, err := look()
		if isCode(err, golibvirt.ERR_NO_SECRET) {
			continue
		}
		if err != nil {
			return wrapLibvirt(err)
		}
		err = s.Undefine()
		s.Free()
		if err != nil && !isCode(err, golibvirt.ERR_NO_SECRET) {
			return wrapLibvirt(err)
		}
	}
	return nil
}

// UndefineSecret removes a VM's vTPM secret; a missing one is not an error.
// A running vTPM is not affected (libvirt read the secret when it started).
func (h *Hypervisor) UndefineSecret(ctx context.Context, vmUUID string) error {
	if err := h.with(ctx, func(c *golibvirt.Connect) error { return undefineSecrets(c, vmUUID) }); err != nil {
		return fmt.Errorf("undefine secret %s on %s: %w", vmUUID, h.cfg.Name, err)
	}
	return nil
}

// HasSecret reports whether the VM's vTPM secret is defined here.
func (h *Hypervisor) HasSecret(ctx context.Context, vmUUID string) (bool, error) {
	var ok bool
	err := h.with(ctx, func(c *golibvirt.Connect) error {
		var err error
		ok, err = hasSecret(c, hypervisor.SecretUUID(vmUUID))
		return err
	})
	if err != nil {
		return false, fmt.Errorf("has secret %s on %s: %w", vmUUID, h.cfg.Name, err)
	}
	return ok, nil
}

func hasSecret(c *golibvirt.Connect, secretUUID string) (bool, error) {
	s, err := c.LookupSecretByUUIDString(secretUUID)
	if isCode(err, golibvirt.ERR_NO_SECRET) {
		return false, nil
	}
	if err != nil {
		return false, wrapLibvirt(err)
	}
	s.Free()
	return true, nil
}

// libvirtError extracts a libvirt error.
func libvirtError(err error) (golibvirt.Error, bool) {
	var le golibvirt.Error
	if errors.As(err, &le) {
		return le, true
	}
	return le, false
}

func isCode(err error, code golibvirt.ErrorNumber) bool {
	le, ok := libvirtError(err)
	return ok && le.Code == code
}

// wrapLibvirt turns a libvirt error into ErrLibvirt with libvirt's message
// (the binding's Error() text is verbose and hides the message).
func wrapLibvirt(err error) error {
	if err == nil {
		return nil
	}
	if le, ok := libvirtError(err); ok {
		return fmt.Errorf("%w: %s (code %d)", ErrLibvirt, le.Message, le.Code)
	}
	return err
}
