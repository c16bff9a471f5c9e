package escrow

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"unicode/utf8"

	"filippo.io/age"
	"filippo.io/age/plugin"
	"filippo.io/age/tag"
	"github.com/sirupsen/logrus"
)

// Kind names a type of age recipient or identity. Plugins are
// "plugin:NAME".
type Kind string

// The native kinds. Hybrid kinds combine ML-KEM-768 with a classic curve
// and are safe against a future quantum computer.
const (
	KindX25519 Kind = "x25519"          // age1…
	KindHybrid Kind = "mlkem768x25519"  // age1pq1…
	KindTag    Kind = "p256tag"         // age1tag1… (hardware keys; decrypted by their plugin)
	KindTagPQ  Kind = "mlkem768p256tag" // age1tagpq1…
)

const (
	maxLine          = 8 << 10 // one recipient or identity line, as age's CLI
	maxKeyFile       = 1 << 20 // a recipients or identities file
	fingerprintBytes = 8
)

// PostQuantum reports whether the kind resists a quantum computer.
// Plugins are unknown and count as classic.
func (k Kind) PostQuantum() bool { return k == KindHybrid || k == KindTagPQ }

// Plugin returns the plugin name of a plugin kind, or "".
func (k Kind) Plugin() string {
	name, _ := strings.CutPrefix(string(k), "plugin:")
	if name == string(k) {
		return ""
	}
	return name
}

// Recipient is one parsed age recipient: a public key, safe to print.
type Recipient struct {
	enc  string
	kind Kind
	r    age.Recipient
}

// String returns the recipient's encoding (age1…).
func (r Recipient) String() string { return r.enc }

// Kind returns the recipient's kind.
func (r Recipient) Kind() Kind { return r.kind }

// Fingerprint identifies the recipient in bundles and errors: the first 8
// bytes of SHA-256 of its lowercase encoding, in hex.
func (r Recipient) Fingerprint() string { return fingerprint(r.enc) }

func fingerprint(enc string) string {
	h := sha256.Sum256([]byte(strings.ToLower(enc)))
	return hex.EncodeToString(h[:fingerprintBytes])
}

// NonInteractiveUI is the plugin UI used when the caller gives none: it
// logs a plugin's messages (nil log: drops them) and refuses every request
// for input or confirmation, so a daemon never hangs on a prompt.
func NonInteractiveUI(log logrus.FieldLogger) *plugin.ClientUI {
	return &plugin.ClientUI{
		DisplayMessage: func(name, msg string) error {
			if log != nil {
				log.WithField("plugin", name).Info(msg)
			}
			return nil
		},
		RequestValue: func(name, prompt string, _ bool) (string, error) {
			return "", fmt.Errorf("%w: plugin %s asked for input (%q) and there is no terminal", ErrPlugin, name, prompt)
		},
		Confirm: func(name, prompt, _, _ string) (bool, error) {
			return false, fmt.Errorf("%w: plugin %s asked for a confirmation (%q) and there is no terminal", ErrPlugin, name, prompt)
		},
		WaitTimer: func(name string) {
			if log != nil {
				log.WithField("plugin", name).Info("waiting for the age plugin (a hardware token may need a touch)")
			}
		},
	}
}

// ParseRecipient parses one recipient: age1… (X25519), age1pq1… (ML-KEM-768
// + X25519), age1tag1… / age1tagpq1… (tagged P-256 keys of hardware
// tokens) or age1NAME1… (an age plugin, run as age-plugin-NAME when a
// bundle is sealed; ui handles its prompts, nil: NonInteractiveUI). The
// error says why a string is refused; it never echoes something that looks
// like a private key.
func ParseRecipient(s string, ui *plugin.ClientUI) (Recipient, error) {
	s = strings.TrimSpace(s)
	if ui == nil {
		ui = NonInteractiveUI(nil)
	}
	lower := strings.ToLower(s)
	switch {
	case s == "":
		return Recipient{}, fmt.Errorf("%w: empty recipient", ErrBadRecipient)
	case strings.HasPrefix(strings.ToUpper(s), "AGE-"):
		return Recipient{}, fmt.Errorf("%w: this is an identity (a private key), not a recipient: give its public recipient (age-keygen -y) and keep the identity offline", ErrBadRecipient)
	case strings.HasPrefix(s, "ssh-") || strings.HasPrefix(s, "ecdsa-"):
		return Recipient{}, fmt.Errorf("%w: %s: SSH keys are not supported for escrow; use an age X25519, post-quantum or plugin recipient", ErrBadRecipient, short(s))
	case !strings.HasPrefix(lower, "age1"):
		return Recipient{}, fmt.Errorf("%w: %s: not an age recipient (want age1…)", ErrBadRecipient, short(s))
	case len(s) > maxLine:
		return Recipient{}, fmt.Errorf("%w: %s: %d characters (limit %d)", ErrBadRecipient, short(s), len(s), maxLine)
	}
	var (
		r    age.Recipient
		kind Kind
		err  error
	)
	switch {
	case strings.HasPrefix(lower, "age1tag1") || strings.HasPrefix(lower, "age1tagpq1"):
		var tr *tag.Recipient
		if tr, err = tag.ParseRecipient(s); err == nil {
			r, kind = tr, KindTag
			if tr.Hybrid() {
				kind = KindTagPQ
			}
		}
	case strings.HasPrefix(lower, "age1pq1"):
		r, err = age.ParseHybridRecipient(s)
		kind = KindHybrid
	case strings.Count(s, "1") > 1: // bech32 data never holds a '1': a second one ends a plugin name
		var pr *plugin.Recipient
		if pr, err = plugin.NewRecipient(s, ui); err == nil {
			r, kind = pr, Kind("plugin:"+pr.Name())
		}
	default:
		r, err = age.ParseX25519Recipient(s)
		kind = KindX25519
	}
	if err != nil {
		return Recipient{}, fmt.Errorf("%w: %s: %s", ErrBadRecipient, short(s), scrub(err, s))
	}
	enc := s
	if st, ok := r.(fmt.Stringer); ok && kind.Plugin() == "" {
		enc = st.String() // the canonical lowercase encoding
	}
	return Recipient{enc: enc, kind: kind, r: r}, nil
}

// ParseRecipientsFile parses an age recipients file: one recipient per
// line, blank lines and lines starting with '#' ignored. Errors name the
// source and the line.
func ParseRecipientsFile(source string, rd io.Reader, ui *plugin.ClientUI) ([]Recipient, error) {
	var out []Recipient
	err := eachLine(source, rd, func(n int, line string) error {
		r, err := ParseRecipient(line, ui)
		if err != nil {
			return fmt.Errorf("%s line %d: %w", source, n, err)
		}
		out = append(out, r)
		return nil
	})
	if err != nil {
		return nil, wrapIfPlain(err, ErrBadRecipient)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%w: %s holds no recipient", ErrBadRecipient, source)
	}
	return out, nil
}

// eachLine calls fn for every line that is not blank or a comment, with
// size limits on the file and on each line.
func eachLine(source string, rd io.Reader, fn func(n int, line string) error) error {
	lr := &io.LimitedReader{R: rd, N: maxKeyFile + 1}
	sc := bufio.NewScanner(lr)
	sc.Buffer(make([]byte, 0, 4096), maxLine+1)
	n := 0
	for sc.Scan() {
		n++
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if !utf8.ValidString(line) {
			return fmt.Errorf("%s line %d: not valid UTF-8", source, n)
		}
		if err := fn(n, line); err != nil {
			return err
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("%s: line %d: %v", source, n+1, err)
	}
	if lr.N <= 0 {
		return fmt.Errorf("%s: larger than %d bytes", source, maxKeyFile)
	}
	return nil
}

// short shows the start of a public string in an error.
func short(s string) string {
	if utf8.RuneCountInString(s) > 24 {
		s = string([]rune(s)[:20]) + "…"
	}
	return strconv.Quote(s)
}

// scrub removes the full input from a library's error text.
func scrub(err error, s string) string {
	msg := err.Error()
	msg = strings.ReplaceAll(msg, strconv.Quote(s), short(s))
	return strings.ReplaceAll(msg, s, short(s))
}

// wrapIfPlain adds sentinel to an error that does not already carry it.
func wrapIfPlain(err, sentinel error) error {
	if err == nil || errors.Is(err, sentinel) {
		return err
	}
	return fmt.Errorf("%w: %w", sentinel, err)
}
