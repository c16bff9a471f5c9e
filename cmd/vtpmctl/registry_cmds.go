package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/vtpmm/vtpmm/internal/adminapi"
	"github.com/vtpmm/vtpmm/internal/errclass"
	"github.com/vtpmm/vtpmm/migrate/registry"
	"github.com/vtpmm/vtpmm/migrate/registry/operator"
)

// exitUnavailable is vtpmctl's exit code when the fleet registry has no
// quorum (errclass.CodeUnavailable).
const exitUnavailable = 6

// registryFlags is how an operator command reaches the fleet registry:
// with the operator's own certificate (etcd's root role), never a host's.
// The endpoints default to the ones the local vtpmd uses.
type registryFlags struct {
	endpoints      []string
	pki, user      string
	ca, cert, key  string
	prefix         string
	timeout        time.Duration
	socket         *string
	endpointSource string
}

func (f *registryFlags) add(c *cobra.Command) {
	fl := c.PersistentFlags()
	fl.StringSliceVar(&f.endpoints, "registry", nil, "the fleet registry's endpoints (https://HOST:2379,...; default: the local vtpmd's)")
	fl.StringVar(&f.pki, "pki", "/etc/vtpmm/pki", "directory of the operator's certificate: ca.crt, USER.crt, USER.key (vtpmctl pki issue USER --client)")
	fl.StringVar(&f.user, "user", "root", "the operator's registry user: its certificate's common name")
	fl.StringVar(&f.ca, "ca", "", "CA certificate (default PKI/ca.crt)")
	fl.StringVar(&f.cert, "cert", "", "the operator's certificate (default PKI/USER.crt)")
	fl.StringVar(&f.key, "key", "", "the operator's key (default PKI/USER.key)")
	fl.StringVar(&f.prefix, "prefix", "", "the registry's key prefix (default the local vtpmd's, or /vtpmm/v1/)")
	fl.DurationVar(&f.timeout, "registry-timeout", 5*time.Second, "how long a registry request may wait for a quorum")
}

// open opens the registry as the operator.
func (f *registryFlags) open(ctx context.Context) (*registry.Client, error) {
	eps, prefix := f.endpoints, f.prefix
	if len(eps) == 0 || prefix == "" {
		info, err := adminapi.NewClient(*f.socket).Registry(ctx)
		if err != nil && len(eps) == 0 {
			return nil, fmt.Errorf("the fleet registry's endpoints: ask the local vtpmd (%w) or pass --registry", err)
		}
		if err == nil {
			if len(eps) == 0 {
				if info.Mode == string(registry.ModeNone) {
					return nil, fmt.Errorf("the local vtpmd runs without a fleet registry (registry mode none); pass --registry")
				}
				eps, f.endpointSource = info.Endpoints, "the local vtpmd"
			}
			if prefix == "" {
				prefix = info.Prefix
			}
		}
	}
	pick := func(v, def string) string {
		if v != "" {
			return v
		}
		return filepath.Join(f.pki, def)
	}
	return registry.OpenClient(ctx, registry.Config{
		Mode: registry.ModeEtcd, Host: f.user, Endpoints: eps, Prefix: prefix, NoFollow: true, OpTimeout: f.timeout,
		CAFile: pick(f.ca, "ca.crt"), CertFile: pick(f.cert, f.user+".crt"), KeyFile: pick(f.key, f.user+".key"),
	})
}

// with opens the registry as the operator, runs fn with it and closes it.
// A registry that cannot be opened is registryExit's error; fn's errors
// are returned as fn gives them.
func (f *registryFlags) with(ctx context.Context, fn func(reg *registry.Client) error) error {
	reg, err := f.open(ctx)
	if err != nil {
		return registryExit(err)
	}
	defer reg.Close()
	return fn(reg)
}

// registryExit gives a registry error its exit code: 6 without quorum,
// else its class's (errclass), else 1.
func registryExit(err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, registry.ErrNoQuorum) || errors.Is(err, registry.ErrTLS) || errors.Is(err, registry.ErrClosed) {
		return &exitError{code: exitUnavailable, err: err}
	}
	return &exitError{code: errclass.ExitCode(err), err: err}
}

// registryCommands are 'vtpmctl registry ...': the fleet registry's
// set-up and care, as the operator.
func registryCommands(e *env, socket *string) *cobra.Command {
	rf := &registryFlags{socket: socket}
	c := &cobra.Command{Use: "registry", Short: "Set up and operate the fleet registry (etcd) as the operator"}
	rf.add(c)
	var hosts []string
	boot := &cobra.Command{
		Use:   "bootstrap [--hosts HOST,...]",
		Short: "Set up the registry's access control: the operator as etcd's root, every host confined to vtpmm's prefix",
		Long: "bootstrap enables etcd's authentication with client certificates (the certificate's CN is the\n" +
			"user): the operator (--user, default root) gets etcd's root role; each host named gets its\n" +
			"user, with read access to vtpmm's prefix, write access to VM and standby records (ownership\n" +
			"changes are compare-and-swap), and its own host, liveness and evacuation records only.\n" +
			"Idempotent. Run it before handing out host certificates: until then any fleet certificate\n" +
			"may do anything in the registry. Hosts added later: 'registry add-host' or 'host enroll'.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return rf.with(cmd.Context(), func(reg *registry.Client) error {
				t0 := time.Now()
				n, err := reg.Bootstrap(cmd.Context(), registry.BootstrapOptions{Admin: rf.user, Hosts: hosts})
				if err != nil {
					return registryExit(err)
				}
				who := "hosts get their registry users when enrolled (host enroll) or added (registry add-host)"
				if len(hosts) > 0 {
					who = "registry users for " + strings.Join(hosts, ", ")
				}
				fmt.Fprintf(e.stdout, "registry bootstrapped in %s (%d requests): authentication on (client certificates); %s holds etcd's root role; %s; every host confined to vtpmm's prefix\n",
					time.Since(t0).Round(time.Millisecond), n, rf.user, who)
				return nil
			})
		},
	}
	boot.Flags().StringSliceVar(&hosts, "hosts", nil, "hosts to give their registry users now")
	addHost := &cobra.Command{
		Use:   "add-host HOST",
		Short: "Give HOST its registry user and roles, so that its vtpmd can register (host enroll does it too)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return rf.with(cmd.Context(), func(reg *registry.Client) error {
				n, err := reg.AddHostUser(cmd.Context(), args[0])
				if err != nil {
					return registryExit(err)
				}
				fmt.Fprintf(e.stdout, "%s may register now (%d requests)\n", args[0], n)
				return nil
			})
		},
	}
	snapshot := &cobra.Command{
		Use:   "snapshot FILE",
		Short: "Write a consistent snapshot of the whole registry to FILE (etcd's format; mode 0600)",
		Long: "snapshot is the registry's backup: ownership, hosts, enrolments and states, never a key. Restore\n" +
			"it on every member with 'vtpmd registry restore' (embedded) or 'etcdutl snapshot restore\n" +
			"--bump-revision 1073741824 --mark-compacted' (external); a restore older than the hosts is\n" +
			"raised by them (docs/registry.md, \"Backup and restore\").",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return rf.with(cmd.Context(), func(reg *registry.Client) error {
				tmp := args[0] + ".part"
				out, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
				if err != nil {
					return err
				}
				defer os.Remove(tmp)
				t0 := time.Now()
				if err := reg.Snapshot(cmd.Context(), out); err != nil {
					out.Close()
					return registryExit(err)
				}
				if err := out.Sync(); err != nil {
					out.Close()
					return err
				}
				st, _ := out.Stat()
				if err := out.Close(); err != nil {
					return err
				}
				if err := os.Rename(tmp, args[0]); err != nil {
					return err
				}
				fmt.Fprintf(e.stdout, "snapshot of the registry written to %s (%d bytes, %s)\n", args[0], st.Size(), time.Since(t0).Round(time.Millisecond))
				return nil
			})
		},
	}
	var asJSON bool
	members := &cobra.Command{
		Use:   "members",
		Short: "List the registry's etcd members",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return rf.with(cmd.Context(), func(reg *registry.Client) error {
				ms, err := reg.Members(cmd.Context())
				if err != nil {
					return registryExit(err)
				}
				if asJSON {
					return json.NewEncoder(e.stdout).Encode(ms)
				}
				w := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
				fmt.Fprintln(w, "NAME\tPEER URL\tCLIENT URL")
				for _, m := range ms {
					fmt.Fprintf(w, "%s\t%s\t%s\n", orDash(m.Name), m.PeerURL, orDash(m.ClientURL))
				}
				return w.Flush()
			})
		},
	}
	members.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	memberRemove := &cobra.Command{
		Use:   "member-remove NAME",
		Short: "Remove a lost member from the cluster (replace it with member-add, one at a time)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return rf.with(cmd.Context(), func(reg *registry.Client) error {
				if err := reg.RemoveMember(cmd.Context(), args[0]); err != nil {
					return registryExit(err)
				}
				fmt.Fprintf(e.stdout, "member %s removed\n", args[0])
				return nil
			})
		},
	}
	memberAdd := &cobra.Command{
		Use:   "member-add NAME PEER_URL",
		Short: "Announce a replacement member; start its vtpmd with embedded.cluster_state existing and the members printed",
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			return rf.with(cmd.Context(), func(reg *registry.Client) error {
				ms, err := reg.AddMember(cmd.Context(), registry.Member{Name: args[0], PeerURL: args[1]})
				if err != nil {
					return registryExit(err)
				}
				fmt.Fprintf(e.stdout, "member %s announced; start it with cluster_state: existing and these members plus itself:\n", args[0])
				for _, m := range ms {
					fmt.Fprintf(e.stdout, "  - {name: %s, peer_url: %q, client_url: %q}\n", m.Name, m.PeerURL, m.ClientURL)
				}
				return nil
			})
		},
	}
	c.AddCommand(boot, addHost, snapshot, members, memberAdd, memberRemove)
	return c
}

// hostRegistryCommands are 'vtpmctl host enroll|drain|undrain|fence' with
// a fleet registry.
func hostStateCommands(e *env, rf *registryFlags) []*cobra.Command {
	var out []*cobra.Command
	for _, s := range []struct {
		use, short string
		state      registry.HostState
	}{
		{"drain HOST", "Mark HOST draining: no migration may start towards it (VMs may leave it)", registry.StateDraining},
		{"undrain HOST", "Mark HOST active again", registry.StateActive},
		{"fence HOST", "Fence HOST: it never becomes the owner of a VM again (a retired, dead or untrusted host)", registry.StateFenced},
	} {
		out = append(out, &cobra.Command{
			Use: s.use, Short: s.short, Args: cobra.ExactArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				return rf.with(cmd.Context(), func(reg *registry.Client) error {
					if err := reg.SetState(cmd.Context(), args[0], s.state); err != nil {
						return registryExit(err)
					}
					fmt.Fprintf(e.stdout, "%s is %s\n", args[0], s.state)
					return nil
				})
			},
		})
	}
	return out
}

// enrollInRegistry enrols host once for the whole fleet (operator.Enroll).
func enrollInRegistry(cmd *cobra.Command, e *env, rf *registryFlags, admin *adminapi.Client, host, addr string, wait time.Duration) error {
	return rf.with(cmd.Context(), func(reg *registry.Client) error {
		rep, err := operator.Enroll(cmd.Context(), reg, admin, host, operator.EnrollOptions{Addr: addr, Wait: wait, By: rf.user})
		if err != nil {
			if errors.Is(err, errclass.Refused) {
				return &exitError{code: exitRefused, err: err}
			}
			return registryExit(err)
		}
		info := rep.Info
		fmt.Fprintf(e.stdout, "%s enrolled in the fleet registry by %s (%s): EK %s…, AK %s…; every host trusts it\n",
			host, rf.user, info.Method, info.EKDigest[:16], info.AKName[:16])
		fmt.Fprintf(e.stdout, "  TPM check on %s: %s; registry: %d requests; total %s\n", admin.Socket(), rep.Check.Round(time.Millisecond),
			rep.RegistryOps, rep.Took.Round(time.Millisecond))
		if info.EKChain != "" {
			fmt.Fprintf(e.stdout, "EK certificate path:\n%s", indentLines(info.EKChain))
		}
		return nil
	})
}
