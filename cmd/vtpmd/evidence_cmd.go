package main

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/vtpmm/vtpmm/attest"
	"github.com/vtpmm/vtpmm/cmd/vtpmd/daemon"
	"github.com/vtpmm/vtpmm/internal/atomicfile"
	"github.com/vtpmm/vtpmm/internal/strictjson"
	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/host"
	"github.com/vtpmm/vtpmm/vtpm/identity"
)

// defaultEventLog is where Linux exposes the firmware's TCG event log.
const defaultEventLog = "/sys/kernel/security/tpm0/binary_bios_measurements"

// evidenceFlags are the flags shared by the evidence subcommands.
type evidenceFlags struct {
	ekKind string
}

func evidenceCmd(e *env) *cobra.Command {
	var (
		f          evidenceFlags
		nonceHex   string
		out        string
		eventLog   string
		policyPath string
		pcrs       []string
		inters     []string
	)
	c := &cobra.Command{
		Use:   "evidence --nonce HEX [-o FILE]",
		Short: "Produce attestation evidence (quote, MK certification, EK) for a verifier's nonce",
		Long: "evidence writes the attestation evidence JSON for the verifier's nonce: TPM2_Certify of the\n" +
			"migration key and TPM2_Quote by the AK, both over the nonce, the PCR values, the EK\n" +
			"certificate and the event log. The keys must exist ('vtpmd evidence provision').\n" +
			"The PCRs quoted are those of --policy (the verifier's policy file), or --quote-pcrs, or sha256:0-9.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			nonce, err := hex.DecodeString(strings.TrimSpace(nonceHex))
			if err != nil || nonceHex == "" {
				return fmt.Errorf("evidence: --nonce must be the verifier's nonce in hex (16..32 bytes)")
			}
			sel, err := quoteSelection(policyPath, pcrs)
			if err != nil {
				return err
			}
			log, err := readEventLog(eventLog, cmd.Flags().Changed("event-log"))
			if err != nil {
				return err
			}
			var interDER [][]byte
			for _, p := range inters {
				b, err := os.ReadFile(p)
				if err != nil {
					return fmt.Errorf("evidence: --ek-intermediate: %w", err)
				}
				cs, err := attest.ParseCertificates(b)
				if err != nil {
					return fmt.Errorf("evidence: --ek-intermediate %s: %w", p, err)
				}
				for _, c := range cs {
					interDER = append(interDER, c.Raw)
				}
			}
			return withIdentity(cmd.Context(), e, f, func(cfg daemon.Config, m *vtpm.Meter, id *identity.Identity) error {
				before := m.Stats()
				ev, err := identity.Produce(cmd.Context(), m, identity.ProduceOptions{
					HostID: cfg.HostID, Nonce: nonce, PCRs: sel, EventLog: log, EKIntermediates: interDER,
					Identity: id, Now: time.Now,
				})
				if err != nil {
					return err
				}
				st := m.Stats().Sub(before)
				e.log.WithFields(map[string]any{"tpm_commands": st.Total, "commands": st.String()}).Info("evidence produced")
				raw, err := ev.Encode()
				if err != nil {
					return err
				}
				return writeOutput(e, out, append(raw, '\n'))
			})
		},
	}
	fl := c.Flags()
	fl.StringVar(&nonceHex, "nonce", "", "the verifier's nonce (hex, 16..32 bytes)")
	fl.StringVarP(&out, "output", "o", "", "write the evidence to FILE (default: stdout)")
	fl.StringVar(&eventLog, "event-log", defaultEventLog, "TCG event log to include ('' or 'none': no log)")
	fl.StringVar(&policyPath, "policy", "", "quote the PCRs this verifier policy checks")
	fl.StringArrayVar(&pcrs, "quote-pcrs", nil, "PCRs to quote as BANK:LIST, e.g. sha256:0,1,2,3,4,5,6,7 (repeatable)")
	fl.StringArrayVar(&inters, "ek-intermediate", nil, "certificate file sent along to build the EK path (repeatable)")
	c.PersistentFlags().StringVar(&f.ekKind, "ek", "auto", "endorsement key to present: auto, rsa or ecc")
	c.AddCommand(evidenceProvisionCmd(e, &f), evidenceIdentityCmd(e, &f), evidenceActivateCmd(e, &f))
	return c
}

func evidenceProvisionCmd(e *env, f *evidenceFlags) *cobra.Command {
	var createEK bool
	c := &cobra.Command{
		Use:   "provision",
		Short: "Create the attestation key and the migration key once (persistent; idempotent)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, m, closeTPM, err := openTPM(cmd.Context(), e)
			if err != nil {
				return err
			}
			defer closeTPM()
			h, err := handles(cfg)
			if err != nil {
				return err
			}
			if _, err := identity.Provision(cmd.Context(), m, identity.ProvisionOptions{Handles: h, CreateEK: createEK}); err != nil {
				return err
			}
			kind, _ := identity.ParseEKKind(f.ekKind)
			id, err := identity.LoadIdentity(cmd.Context(), m, identity.LoadOptions{Handles: h, EKKind: kind})
			if err != nil {
				return err
			}
			cert := "no EK certificate: enrol the EK public area with the verifier"
			if id.EK.Cert != nil {
				cert = fmt.Sprintf("EK certificate in NV 0x%08x", uint32(id.EK.CertNV))
			}
			fmt.Fprintf(e.stdout, "host %s: AK 0x%08x (%x), MK 0x%08x (%x), %s EK 0x%08x, %s (%d TPM commands)\n",
				cfg.HostID, uint32(id.AK.Handle), id.AK.Name, uint32(id.MK.Handle), id.MK.Name,
				id.EK.Kind, uint32(id.EK.Handle), cert, m.Stats().Total)
			return nil
		},
	}
	c.Flags().BoolVar(&createEK, "create-ek", false, "create and persist an RSA EK if the TPM has none (slow on discrete TPMs)")
	return c
}

// enrolmentRequest is what an operator hands to the verifier to enrol a host.
type enrolmentRequest struct {
	HostID   string `json:"host_id"`
	EKKind   string `json:"ek_kind"`
	EKPublic []byte `json:"ek_public"`
	EKCert   []byte `json:"ek_cert,omitempty"`
	EKDigest string `json:"ek_digest"`
	AKPublic []byte `json:"ak_public"`
	AKName   string `json:"ak_name"`
}

func evidenceIdentityCmd(e *env, f *evidenceFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "identity",
		Short: "Print this host's EK and AK (JSON) for enrolment by a verifier",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return withIdentity(cmd.Context(), e, *f, func(cfg daemon.Config, _ *vtpm.Meter, id *identity.Identity) error {
				enc := json.NewEncoder(e.stdout)
				enc.SetIndent("", "  ")
				return enc.Encode(enrolmentRequest{
					HostID: cfg.HostID, EKKind: id.EK.Kind.String(), EKPublic: id.EK.Public, EKCert: id.EK.Cert,
					EKDigest: hex.EncodeToString(id.EK.Digest()), AKPublic: id.AK.Public, AKName: hex.EncodeToString(id.AK.Name),
				})
			})
		},
	}
}

func evidenceActivateCmd(e *env, f *evidenceFlags) *cobra.Command {
	var in, out string
	c := &cobra.Command{
		Use:   "activate [-i CHALLENGE.json] [-o FILE]",
		Short: "Answer a credential-activation challenge (attest.ActivationChallenge JSON) with the TPM",
		Long: "activate reads the verifier's challenge {credential_blob, encrypted_secret, ek_digest, ak_name}\n" +
			"(from -i FILE or stdin), runs TPM2_ActivateCredential with the AK and the EK, and prints\n" +
			"{\"secret\": \"<hex>\"} for the verifier's VerifyActivation.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			r := e.stdin
			if in != "" && in != "-" {
				fh, err := os.Open(in)
				if err != nil {
					return fmt.Errorf("activate: %w", err)
				}
				defer fh.Close()
				r = fh
			}
			var ch attest.ActivationChallenge
			if err := strictjson.DecodeReader(r, &ch, 1<<16); err != nil {
				return fmt.Errorf("activate: the challenge is not an activation challenge JSON: %w", err)
			}
			return withIdentity(cmd.Context(), e, *f, func(_ daemon.Config, m *vtpm.Meter, id *identity.Identity) error {
				secret, err := identity.ActivateCredential(cmd.Context(), m, id, &ch)
				if err != nil {
					return err
				}
				b, _ := json.Marshal(map[string]string{"secret": hex.EncodeToString(secret)})
				return writeOutput(e, out, append(b, '\n'))
			})
		},
	}
	c.Flags().StringVarP(&in, "input", "i", "", "challenge file (default: stdin)")
	c.Flags().StringVarP(&out, "output", "o", "", "write the answer to FILE (default: stdout)")
	return c
}

// openTPM opens the configured TPM behind a command meter.
func openTPM(ctx context.Context, e *env) (daemon.Config, *vtpm.Meter, func(), error) {
	cfg, err := e.config()
	if err != nil {
		return daemon.Config{}, nil, nil, err
	}
	m, err := host.OpenTPM(ctx, cfg.Config, e.opts())
	if err != nil {
		return daemon.Config{}, nil, nil, err
	}
	return cfg, m, func() { _ = m.Close() }, nil
}

// withIdentity opens the TPM, loads the provisioned identity and runs fn.
func withIdentity(ctx context.Context, e *env, f evidenceFlags, fn func(daemon.Config, *vtpm.Meter, *identity.Identity) error) error {
	kind, err := identity.ParseEKKind(f.ekKind)
	if err != nil {
		return err
	}
	cfg, m, closeTPM, err := openTPM(ctx, e)
	if err != nil {
		return err
	}
	defer closeTPM()
	h, err := handles(cfg)
	if err != nil {
		return err
	}
	id, err := identity.LoadIdentity(ctx, m, identity.LoadOptions{Handles: h, EKKind: kind})
	if errors.Is(err, identity.ErrNotProvisioned) {
		return fmt.Errorf("%w (run 'vtpmd evidence provision')", err)
	}
	if err != nil {
		return err
	}
	return fn(cfg, m, id)
}

// handles uses the vault's SRK; AK and MK are at their default handles.
func handles(cfg daemon.Config) (identity.Handles, error) {
	srk, err := cfg.SRKHandle()
	if err != nil {
		return identity.Handles{}, err
	}
	return identity.Handles{SRK: srk}, nil
}

// quoteSelection returns the PCRs to quote: the policy's, or --quote-pcrs, or the default.
func quoteSelection(policyPath string, pcrs []string) (map[attest.Bank][]int, error) {
	if policyPath != "" && len(pcrs) > 0 {
		return nil, fmt.Errorf("evidence: give --policy or --quote-pcrs, not both")
	}
	if policyPath != "" {
		p, err := attest.LoadPolicy(policyPath)
		if err != nil {
			return nil, fmt.Errorf("evidence: --policy: %w", err)
		}
		return identity.PCRsForPolicy(p), nil
	}
	if len(pcrs) == 0 {
		return identity.DefaultQuotePCRs, nil
	}
	out := map[attest.Bank][]int{}
	for _, s := range pcrs {
		bank, list, ok := strings.Cut(s, ":")
		if !ok {
			return nil, fmt.Errorf("evidence: --quote-pcrs %q: want BANK:LIST, e.g. sha256:0,1,7", s)
		}
		for _, f := range strings.Split(list, ",") {
			i, err := strconv.Atoi(strings.TrimSpace(f))
			if err != nil || i < 0 || i > 23 {
				return nil, fmt.Errorf("evidence: --quote-pcrs %q: %q is not a PCR index 0..23", s, f)
			}
			out[attest.Bank(bank)] = append(out[attest.Bank(bank)], i)
		}
	}
	return out, nil
}

// readEventLog reads the event log. The default path may be absent (no
// firmware log, e.g. an emulated TPM): then no log is sent. A path given
// explicitly must be readable.
func readEventLog(path string, explicit bool) ([]byte, error) {
	if path == "" || path == "none" {
		return nil, nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		if !explicit && errors.Is(err, os.ErrNotExist) {
			return nil, nil
		}
		return nil, fmt.Errorf("evidence: event log: %w", err)
	}
	return b, nil
}

func writeOutput(e *env, path string, data []byte) error {
	if path == "" || path == "-" {
		_, err := e.stdout.Write(data)
		return err
	}
	return atomicfile.WriteFile(path, data, 0o600)
}
