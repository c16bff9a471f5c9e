// Command fence_lab is the lab's fence agent, following the convention of
// Pacemaker's fence agents (fence_ipmilan, fence_virsh, ...): it fences a
// lab host by cutting its power, SIGKILLing every process of the host's
// network namespace (libvirtd, QEMU and their swtpm, vtpmd) and its host
// TPM at once (lab.KillHost); the host stays off until the lab powers it
// on again (lab.Host.PowerOn).
//
//	fence_lab --lab-dir DIR --host HOST --action off|status|monitor|metadata
//
// With no arguments it reads the options from stdin as name=value lines
// (action=off, plug=HOST or port=HOST or host=HOST, lab_dir=DIR), as
// fenced and stonith-ng pass them. DIR is the lab network's directory
// (lab.Network.Dir; default $VTPMM_LAB_DIR); HOST a host's name in it.
//
// Exit codes, as fence agents have them: off: 0 when the host is fenced
// (nothing of it runs), 1 otherwise; status: 0 when the host is on, 2 when
// it is off, 1 on an error; monitor: 0 when DIR is a lab; metadata: 0.
package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/vtpmm/vtpmm/test/lab"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

// Exit codes.
const (
	exitOK  = 0
	exitErr = 1
	exitOff = 2 // status: the host is off
)

type options struct{ action, host, dir string }

func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	o, err := parse(args, stdin)
	if err != nil {
		fmt.Fprintln(stderr, "fence_lab:", err)
		return exitErr
	}
	switch o.action {
	case "metadata":
		fmt.Fprint(stdout, metadata)
		return exitOK
	case "monitor":
		if _, err := os.Stat(o.dir); err != nil {
			fmt.Fprintln(stderr, "fence_lab: monitor:", err)
			return exitErr
		}
		return exitOK
	}
	if o.host == "" || strings.ContainsAny(o.host, "/\x00") || o.host == "." || o.host == ".." {
		fmt.Fprintf(stderr, "fence_lab: %s: a host name is required (--host, plug=)\n", o.action)
		return exitErr
	}
	dir := filepath.Join(o.dir, o.host)
	switch o.action {
	case "off":
		n, err := lab.KillHost(dir)
		if err != nil {
			fmt.Fprintf(stderr, "fence_lab: off %s: %v\n", o.host, err)
			return exitErr
		}
		fmt.Fprintf(stdout, "Success: %s is off (%d processes killed)\n", o.host, n)
		return exitOK
	case "status":
		p, err := lab.FindHostProcs(dir)
		if err != nil {
			fmt.Fprintf(stderr, "fence_lab: status %s: %v\n", o.host, err)
			return exitErr
		}
		if p.Running() == 0 {
			fmt.Fprintf(stdout, "Status: OFF\n")
			return exitOff
		}
		fmt.Fprintf(stdout, "Status: ON (%d processes, host TPM %v)\n", len(p.Netns), p.HostTPM)
		return exitOK
	default:
		fmt.Fprintf(stderr, "fence_lab: action %q is not supported (off, status, monitor, metadata; the lab powers hosts on)\n", o.action)
		return exitErr
	}
}

// parse reads the command line or, when it is empty, stdin's name=value
// lines.
func parse(args []string, stdin io.Reader) (options, error) {
	o := options{action: "off", dir: os.Getenv("VTPMM_LAB_DIR")}
	if len(args) == 0 {
		sc := bufio.NewScanner(stdin)
		for sc.Scan() {
			line := strings.TrimSpace(sc.Text())
			if line == "" || strings.HasPrefix(line, "#") {
				continue
			}
			k, v, ok := strings.Cut(line, "=")
			if !ok {
				return o, fmt.Errorf("stdin: %q is not name=value", line)
			}
			switch k {
			case "action", "option": // "option" is the old name of action
				o.action = v
			case "plug", "port", "host", "nodename":
				o.host = v
			case "lab_dir":
				o.dir = v
			default: // other agents' options (e.g. ipaddr, login) do not apply
			}
		}
		if err := sc.Err(); err != nil {
			return o, err
		}
	} else {
		fs := flag.NewFlagSet("fence_lab", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		fs.StringVar(&o.action, "action", o.action, "off, status, monitor or metadata")
		fs.StringVar(&o.action, "o", o.action, "action (short)")
		fs.StringVar(&o.host, "host", "", "the lab host to fence")
		fs.StringVar(&o.host, "plug", "", "the lab host to fence (fence agents' name)")
		fs.StringVar(&o.host, "n", "", "plug (short)")
		fs.StringVar(&o.dir, "lab-dir", o.dir, "the lab network's directory (default $VTPMM_LAB_DIR)")
		if err := fs.Parse(args); err != nil {
			return o, err
		}
		if fs.NArg() > 0 {
			return o, fmt.Errorf("unexpected arguments %q", fs.Args())
		}
	}
	if o.dir == "" && o.action != "metadata" {
		return o, errors.New("the lab's directory is required (--lab-dir, lab_dir=, $VTPMM_LAB_DIR)")
	}
	return o, nil
}

const metadata = `<?xml version="1.0" ?>
<resource-agent name="fence_lab" shortdesc="Fence agent for vtpmm's libvirt lab hosts (network namespaces)">
<longdesc>Cuts a lab host's power: SIGKILLs every process of its network namespace and its host TPM.</longdesc>
<parameters>
	<parameter name="action" unique="0" required="1"><getopt mixed="-o, --action=[action]"/><content type="string" default="off"/><shortdesc lang="en">Fencing action</shortdesc></parameter>
	<parameter name="plug" unique="0" required="1"><getopt mixed="-n, --plug=[host]"/><content type="string"/><shortdesc lang="en">The lab host</shortdesc></parameter>
	<parameter name="lab_dir" unique="0" required="1"><getopt mixed="--lab-dir=[dir]"/><content type="string"/><shortdesc lang="en">The lab network's directory</shortdesc></parameter>
</parameters>
<actions>
	<action name="off"/>
	<action name="status"/>
	<action name="monitor"/>
	<action name="metadata"/>
</actions>
</resource-agent>
`
