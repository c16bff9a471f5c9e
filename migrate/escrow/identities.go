package escrow

import (
	"fmt"
	"io"
	"strings"

	"filippo.io/age"
	"filippo.io/age/plugin"
)

// Identity is one custodian's private key (or a handle to one held by an
// age plugin, such as a hardware token), used only to open shares at a
// restore. It never prints or marshals its key material: String says what
// it is and where it came from.
type Identity struct {
	id     age.Identity
	kind   Kind
	fp     string // fingerprint of its recipient; "" for plugins (unknown without running them)
	source string // where it was read, e.g. "alice.key line 2"
}

// Kind returns the identity's kind.
func (i *Identity) Kind() Kind { return i.kind }

// Fingerprint returns the fingerprint of the identity's recipient, or ""
// for a plugin identity.
func (i *Identity) Fingerprint() string { return i.fp }

// String describes the identity without its key: kind, source and the
// fingerprint of its recipient.
func (i *Identity) String() string {
	s := fmt.Sprintf("%s identity from %s", i.kind, i.source)
	if i.fp != "" {
		s += " (recipient " + i.fp + ")"
	}
	return s
}

func (i *Identity) GoString() string             { return i.String() }
func (i *Identity) Format(f fmt.State, _ rune)   { _, _ = io.WriteString(f, i.String()) }
func (*Identity) MarshalJSON() ([]byte, error)   { return nil, ErrSecretMarshal }
func (*Identity) MarshalText() ([]byte, error)   { return nil, ErrSecretMarshal }
func (*Identity) MarshalBinary() ([]byte, error) { return nil, ErrSecretMarshal }
func (*Identity) MarshalYAML() (any, error)      { return nil, ErrSecretMarshal }
func (*Identity) GobEncode() ([]byte, error)     { return nil, ErrSecretMarshal }

// ParseIdentity parses one identity: AGE-SECRET-KEY-1… (X25519),
// AGE-SECRET-KEY-PQ-1… (ML-KEM-768 + X25519) or AGE-PLUGIN-NAME-1… (held by
// age-plugin-NAME, e.g. a hardware token; ui handles its prompts, nil:
// NonInteractiveUI). source names it in errors and in String. Errors never
// contain the identity.
func ParseIdentity(s, source string, ui *plugin.ClientUI) (*Identity, error) {
	s = strings.TrimSpace(s)
	if ui == nil {
		ui = NonInteractiveUI(nil)
	}
	upper := strings.ToUpper(s)
	var (
		id   age.Identity
		kind Kind
		fp   string
		err  error
	)
	switch {
	case len(s) > maxLine:
		return nil, fmt.Errorf("%w: %s: %d characters (limit %d)", ErrBadIdentity, source, len(s), maxLine)
	case strings.HasPrefix(upper, "AGE-SECRET-KEY-PQ-1"):
		var h *age.HybridIdentity
		if h, err = age.ParseHybridIdentity(s); err == nil {
			id, kind, fp = h, KindHybrid, fingerprint(h.Recipient().String())
		}
	case strings.HasPrefix(upper, "AGE-SECRET-KEY-1"):
		var x *age.X25519Identity
		if x, err = age.ParseX25519Identity(s); err == nil {
			id, kind, fp = x, KindX25519, fingerprint(x.Recipient().String())
		}
	case strings.HasPrefix(upper, "AGE-PLUGIN-"):
		var p *plugin.Identity
		if p, err = plugin.NewIdentity(s, ui); err == nil {
			id, kind = p, Kind("plugin:"+p.Name())
		}
	case strings.HasPrefix(strings.ToLower(s), "age1"):
		return nil, fmt.Errorf("%w: %s: this is a recipient (a public key), not an identity", ErrBadIdentity, source)
	default:
		return nil, fmt.Errorf("%w: %s: not an age identity (want AGE-SECRET-KEY-1…, AGE-SECRET-KEY-PQ-1… or AGE-PLUGIN-…)", ErrBadIdentity, source)
	}
	if err != nil {
		// age's parse errors do not echo the key; scrub anyway.
		return nil, fmt.Errorf("%w: %s: malformed %s identity: %s", ErrBadIdentity, source, kindOfPrefix(upper), scrub(err, s))
	}
	return &Identity{id: id, kind: kind, fp: fp, source: source}, nil
}

func kindOfPrefix(upper string) string {
	switch {
	case strings.HasPrefix(upper, "AGE-SECRET-KEY-PQ-1"):
		return string(KindHybrid)
	case strings.HasPrefix(upper, "AGE-SECRET-KEY-1"):
		return string(KindX25519)
	}
	return "plugin"
}

// ParseIdentities parses an age identities file (the format age-keygen
// and age plugins write: one identity per line, '#' comments). Each
// identity's source is "SOURCE line N".
func ParseIdentities(source string, rd io.Reader, ui *plugin.ClientUI) ([]*Identity, error) {
	var out []*Identity
	err := eachLine(source, rd, func(n int, line string) error {
		id, err := ParseIdentity(line, fmt.Sprintf("%s line %d", source, n), ui)
		if err != nil {
			return err
		}
		out = append(out, id)
		return nil
	})
	if err != nil {
		return nil, wrapIfPlain(err, ErrBadIdentity)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%w: %s holds no identity", ErrBadIdentity, source)
	}
	return out, nil
}
