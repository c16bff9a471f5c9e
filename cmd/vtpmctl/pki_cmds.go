package main

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/sirupsen/logrus"
	"github.com/spf13/cobra"

	"github.com/vtpmm/vtpmm/internal/pki"
)

// pkiCommands returns the development-CA commands (pki init, pki issue).
func pkiCommands(e *env) []*cobra.Command {
	p := &cobra.Command{Use: "pki", Short: "Development CA for the agents' mutual TLS"}
	p.AddCommand(pkiInitCommand(e), pkiIssueCommand(e))
	return []*cobra.Command{p}
}

func pkiInitCommand(e *env) *cobra.Command {
	var dir, name string
	var validity time.Duration
	c := &cobra.Command{
		Use:   "init --dir DIR",
		Short: "Create a self-signed ECDSA P-256 CA (DIR/ca.crt, DIR/ca.key, mode 0600); never overwrites",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ca, err := pki.InitCA(dir, pki.CAOptions{Name: name, Validity: validity})
			if err != nil {
				return err
			}
			cert := ca.Certificate()
			e.log.WithField("dir", dir).Info("development CA created")
			fmt.Fprintf(e.stdout, "CA %q created in %s\n  certificate  %s\n  private key  %s (keep it offline; mode 0600)\n  valid until  %s\n  SHA-256      %s\n",
				cert.Subject.CommonName, dir, filepath.Join(dir, pki.CACertFile), filepath.Join(dir, pki.CAKeyFile),
				cert.NotAfter.UTC().Format(time.RFC3339), fingerprint(cert))
			return nil
		},
	}
	c.Flags().StringVar(&dir, "dir", "", "CA directory (created with mode 0700 if missing)")
	c.Flags().StringVar(&name, "name", "", `CA common name (default "vtpmm development CA")`)
	c.Flags().DurationVar(&validity, "validity", 0, "CA validity (default 10 years)")
	_ = c.MarkFlagRequired("dir")
	return c
}

func pkiIssueCommand(e *env) *cobra.Command {
	var dir, out string
	var dns, ips []string
	var validity time.Duration
	var force, client bool
	c := &cobra.Command{
		Use:   "issue HOST --dir DIR",
		Short: "Issue a host certificate for both server and client auth (OUT/HOST.crt, OUT/HOST.key, mode 0600)",
		Long: "issue makes a host's fleet certificate: the agent wire's mTLS and, with a fleet registry, its\n" +
			"etcd identity (the CN is its registry user) and, in registry mode embedded, its etcd member's\n" +
			"client and peer certificate (give --ip for every address the member listens on). With\n" +
			"--client it makes a client-only certificate for an operator's registry user instead, e.g.\n" +
			"'vtpmctl pki issue root --client' for the registry's root (vtpmctl registry bootstrap).",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			host := args[0]
			opts := pki.IssueOptions{DNSNames: dns, Validity: validity, Overwrite: force, ClientOnly: client}
			for _, s := range ips {
				ip := net.ParseIP(s)
				if ip == nil {
					return fmt.Errorf("--ip %q: not an IP address", s)
				}
				opts.IPs = append(opts.IPs, ip)
			}
			ca, err := pki.LoadCA(dir)
			if err != nil {
				return err
			}
			if out == "" {
				out = dir
			}
			certPath, keyPath, err := ca.IssueToDir(host, out, opts)
			if err != nil {
				if errors.Is(err, pki.ErrExists) {
					return fmt.Errorf("%w; pass --force to replace it", err)
				}
				return err
			}
			cert, err := readCert(certPath)
			if err != nil {
				return err
			}
			var sans []string
			sans = append(sans, cert.DNSNames...)
			for _, ip := range cert.IPAddresses {
				sans = append(sans, ip.String())
			}
			e.log.WithFields(logrus.Fields{"host": host, "cert": certPath}).Info("host certificate issued")
			fmt.Fprintf(e.stdout, "certificate for %s issued by %q\n  certificate  %s\n  private key  %s (mode 0600)\n  names        %s\n  valid until  %s\n  SHA-256      %s\n",
				host, ca.Certificate().Subject.CommonName, certPath, keyPath, strings.Join(sans, ", "),
				cert.NotAfter.UTC().Format(time.RFC3339), fingerprint(cert))
			return nil
		},
	}
	c.Flags().StringVar(&dir, "dir", "", "CA directory (from pki init)")
	c.Flags().StringVar(&out, "out", "", "output directory (default: the CA directory)")
	c.Flags().StringArrayVar(&dns, "dns", nil, "extra DNS name (repeatable); HOST is always included")
	c.Flags().StringArrayVar(&ips, "ip", nil, "IP address (repeatable); replaces the default 127.0.0.1 and ::1")
	c.Flags().DurationVar(&validity, "validity", 0, "certificate validity (default 1 year, capped at the CA's)")
	c.Flags().BoolVar(&force, "force", false, "replace an existing certificate and key for HOST")
	c.Flags().BoolVar(&client, "client", false, "a client-only certificate (an operator's registry user): no server auth, no IP")
	_ = c.MarkFlagRequired("dir")
	return c
}

func readCert(path string) (*x509.Certificate, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	b, _ := pem.Decode(data)
	if b == nil {
		return nil, fmt.Errorf("%s: no PEM certificate", path)
	}
	return x509.ParseCertificate(b.Bytes)
}

func fingerprint(c *x509.Certificate) string {
	sum := sha256.Sum256(c.Raw)
	return hex.EncodeToString(sum[:])
}
