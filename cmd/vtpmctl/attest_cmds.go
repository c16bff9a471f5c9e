package main

import (
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/vtpmm/vtpmm/attest"
)

// Exit codes of the attestation commands: 1 for unusable input (unreadable
// or malformed files, bad flags), 2 when the verification itself refuses.
const exitRefused = 2

// attestCommands returns the attestation commands (ek, eventlog, evidence).
func attestCommands(e *env) []*cobra.Command {
	return []*cobra.Command{ekCommand(e), eventlogCommand(e), evidenceCommand(e)}
}

// refusalOrInput maps a verification error to its exit code.
func refusalOrInput(err error) error {
	var re *attest.RefusalError
	if errors.As(err, &re) && !errors.Is(err, attest.ErrMalformedEvidence) {
		return &exitError{code: exitRefused, err: err}
	}
	return err
}

func parseAt(at string) (time.Time, error) {
	if at == "" {
		return time.Now(), nil
	}
	t, err := time.Parse(time.RFC3339, at)
	if err != nil {
		return time.Time{}, fmt.Errorf("--at: %w", err)
	}
	return t, nil
}

func ekCommand(e *env) *cobra.Command {
	ek := &cobra.Command{Use: "ek", Short: "Endorsement-key certificates"}
	var roots []string
	var pol attest.CertPolicy
	var at string
	var allowSHA1 bool // deprecated, no effect
	verify := &cobra.Command{
		Use:   "verify CERT",
		Short: "Verify an EK certificate chain (CERT: PEM or DER, NV header allowed; extra PEM blocks are intermediates)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			now, err := parseAt(at)
			if err != nil {
				return err
			}
			if cmd.Flags().Changed("allow-sha1") {
				fmt.Fprintln(e.stderr, "warning: --allow-sha1 is deprecated and has no effect: SHA-1-signed EK chains are accepted by default; use --strict to refuse them")
			}
			store, err := attest.LoadRootStore(roots...)
			if err != nil {
				return err
			}
			data, err := os.ReadFile(args[0])
			if err != nil {
				return err
			}
			certs, err := attest.ParseCertificates(data)
			if err != nil {
				return fmt.Errorf("%s: %w", args[0], err)
			}
			chain, err := store.VerifyEK(certs[0], certs[1:], pol, now)
			if err != nil {
				return refusalOrInput(err)
			}
			if d := chain.SHA1Depths(); len(d) > 0 {
				fmt.Fprintf(e.stderr, "warning: SHA-1 signature(s) accepted at depth %v (EK chains only; --strict refuses them)\n", d)
			}
			fmt.Fprintf(e.stdout, "EK certificate valid; chain (leaf first):\n%s", chain)
			return nil
		},
	}
	verify.Flags().StringArrayVar(&roots, "roots", nil, "directory of trusted roots and intermediates (repeatable)")
	verify.Flags().BoolVar(&pol.Strict, "strict", false, "refuse SHA-1 signatures on the EK path (accepted by default, with a warning)")
	verify.Flags().BoolVar(&allowSHA1, "allow-sha1", false, "deprecated, no effect: SHA-1 EK chains are accepted by default")
	verify.Flags().BoolVar(&pol.CheckValidity, "check-validity", false, "enforce notBefore/notAfter on the whole path")
	verify.Flags().StringVar(&at, "at", "", "verification time (RFC 3339; default now)")
	_ = verify.MarkFlagRequired("roots")
	ek.AddCommand(verify)
	return ek
}

func eventlogCommand(e *env) *cobra.Command {
	el := &cobra.Command{Use: "eventlog", Short: "TCG event logs"}
	var output string
	var events bool
	replay := &cobra.Command{
		Use:   "replay LOG",
		Short: "Replay a binary TCG event log to its final PCR values",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			log, err := readLog(args[0])
			if err != nil {
				return err
			}
			vals := log.Replay()
			switch output {
			case "json":
				out := map[attest.Bank]map[string]string{}
				for bank, m := range vals {
					out[bank] = map[string]string{}
					for i, v := range m {
						out[bank][strconv.Itoa(i)] = hex.EncodeToString(v)
					}
				}
				enc := json.NewEncoder(e.stdout)
				enc.SetIndent("", "  ")
				return enc.Encode(out)
			case "", "table":
				printReplayTable(e, log, vals)
			default:
				return fmt.Errorf("-o %q: want json or table", output)
			}
			if events {
				printEvents(e, log)
			}
			return nil
		},
	}
	replay.Flags().StringVarP(&output, "output", "o", "table", "output format: table or json")
	replay.Flags().BoolVar(&events, "events", false, "also list the events")
	var bank string
	var pcrs []int
	golden := &cobra.Command{
		Use:   "golden LOG",
		Short: "Print a policy (YAML) whose golden values come from this known-good log",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			log, err := readLog(args[0])
			if err != nil {
				return err
			}
			p, err := attest.GoldenFromEventLog(log, attest.Bank(bank), pcrs)
			if err != nil {
				return err
			}
			b, err := p.Marshal()
			if err != nil {
				return err
			}
			_, err = e.stdout.Write(b)
			return err
		},
	}
	golden.Flags().StringVar(&bank, "bank", "sha256", "PCR bank")
	golden.Flags().IntSliceVar(&pcrs, "pcrs", []int{0, 1, 2, 3, 4, 5, 6, 7}, "PCRs to quote and pin")
	el.AddCommand(replay, golden)
	return el
}

func readLog(path string) (*attest.EventLog, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	log, err := attest.ParseEventLog(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return log, nil
}

func printReplayTable(e *env, log *attest.EventLog, vals attest.PCRValues) {
	format := "legacy SHA-1"
	if log.CryptoAgile {
		format = "crypto-agile"
	}
	fmt.Fprintf(e.stdout, "%s event log, %d events\n", format, len(log.Events))
	if loc, why := log.PCR0Locality(); loc != 0 {
		fmt.Fprintf(e.stdout, "PCR 0 replayed from locality %d (%s)\n", loc, why)
	}
	for _, a := range log.UnknownAlgorithms() {
		fmt.Fprintf(e.stdout, "digest algorithm 0x%04x skipped by its declared size (not replayed)\n", a)
	}
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "BANK\tPCR\tVALUE")
	for _, bank := range log.Banks {
		for _, i := range vals.PCRs(bank) {
			fmt.Fprintf(tw, "%s\t%d\t%x\n", bank, i, vals[bank][i])
		}
	}
	tw.Flush()
}

func printEvents(e *env, log *attest.EventLog) {
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "\n#\tPCR\tTYPE\tDIGEST\tDATA")
	for _, ev := range log.Events {
		var d string
		for _, b := range log.Banks {
			if v, ok := ev.Digests[b]; ok {
				d = fmt.Sprintf("%s:%x", b, v)
				break
			}
		}
		if len(d) > 30 {
			d = d[:30] + ".."
		}
		fmt.Fprintf(tw, "%d\t%d\t%s\t%s\t%s\n", ev.Index, ev.PCR, ev.Type, d, ev.Describe())
	}
	tw.Flush()
}

func evidenceCommand(e *env) *cobra.Command {
	evc := &cobra.Command{Use: "evidence", Short: "Attestation evidence"}
	var policyPath, nonceHex, enrollPath, at string
	var roots, akRoots []string
	var explain bool
	verify := &cobra.Command{
		Use:   "verify EVIDENCE",
		Short: "Verify an evidence bundle against a policy",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			now, err := parseAt(at)
			if err != nil {
				return err
			}
			pol, err := attest.LoadPolicy(policyPath)
			if err != nil {
				return err
			}
			for _, d := range pol.Deprecations() {
				fmt.Fprintf(e.stderr, "warning: %s: %s\n", policyPath, d)
			}
			store := attest.NewRootStore()
			if len(roots) > 0 {
				if store, err = attest.LoadRootStore(roots...); err != nil {
					return err
				}
			}
			akStore := attest.NewRootStore()
			if len(akRoots) > 0 {
				if akStore, err = attest.LoadRootStore(akRoots...); err != nil {
					return err
				}
			}
			var enr attest.Enrollments = &attest.MemoryEnrollments{}
			if enrollPath != "" {
				enr = &attest.FileEnrollments{Path: enrollPath}
			}
			data, err := os.ReadFile(args[0])
			if err != nil {
				return err
			}
			ev, err := attest.DecodeEvidence(data)
			if err != nil {
				return err
			}
			nonce := ev.Nonce
			if nonceHex != "" {
				if nonce, err = hex.DecodeString(strings.TrimSpace(nonceHex)); err != nil {
					return fmt.Errorf("--nonce: %w", err)
				}
			} else {
				fmt.Fprintln(e.stderr, "warning: no --nonce given; freshness is NOT checked (the evidence's own nonce is used)")
			}
			v := &attest.Verifier{Roots: store, AKRoots: akStore, Policy: pol, Enrollments: enr, Clock: func() time.Time { return now }, Log: e.log}
			res, err := v.Verify(cmd.Context(), ev, nonce)
			if explain {
				fmt.Fprint(e.stdout, res.Explain())
			}
			if err != nil {
				return refusalOrInput(err)
			}
			if !explain {
				for _, w := range res.Warnings() {
					fmt.Fprintf(e.stderr, "warning: %s: %s\n", res.Host, w)
				}
			}
			fmt.Fprintf(e.stdout, "%s: attestation passed (AK %x, MK %x)\n", res.Host, []byte(res.AKName), []byte(res.MKName))
			return nil
		},
	}
	f := verify.Flags()
	f.StringVar(&policyPath, "policy", "", "policy file (YAML or JSON)")
	f.StringVar(&nonceHex, "nonce", "", "the nonce this verifier issued (hex)")
	f.StringArrayVar(&roots, "roots", nil, "directory of trusted EK roots (repeatable)")
	f.StringArrayVar(&akRoots, "ak-roots", nil, "directory of trusted AK certificate roots, for hosts enrolled on an AK certificate (repeatable)")
	f.StringVar(&enrollPath, "enrollments", "", "enrolment file (JSON) recording activated (EK, AK) pairs")
	f.BoolVar(&explain, "explain", false, "print every rule with its outcome")
	f.StringVar(&at, "at", "", "verification time (RFC 3339; default now)")
	_ = verify.MarkFlagRequired("policy")
	evc.AddCommand(verify)
	return evc
}
