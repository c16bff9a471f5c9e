package soak

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"
)

// PeerLinks cut the links between the members of an etcd cluster (their
// raft traffic), pair by pair and in each direction.
//
// A member advertises one peer URL that every other member dials, and
// raft sends each message on whichever connection is open (a stream that
// the receiver dialled, or a POST that the sender dials), so a plain TCP
// proxy in front of one member cuts nothing: it cannot tell who dials,
// and the traffic goes round it. A front, one per member, listens on the
// URL the member advertises (registry.Embedded.ListenPeerURL is where
// the member itself listens), ends TLS with the member's certificate,
// reads the caller's name from its client certificate (etcd's peers
// present their fleet certificate), and forwards the bytes through the
// Link of that direction ("A>member:B") to the member, over a new TLS
// connection with the caller's certificate. The member sees its peer as
// before; each directed pair is a Link that is up, drop or blackhole.
// A blackholed pair still completes its TLS handshakes with the front.
type PeerLinks struct {
	roots  *x509.CertPool
	certs  map[string]tls.Certificate // member -> its certificate
	fronts map[string]*peerFront      // member -> its front
	links  map[string]*Link           // "A>member:B"
}

type peerFront struct {
	name   string
	lis    net.Listener
	target func() string // where the member listens
	p      *PeerLinks
	wg     sync.WaitGroup
}

// PeerLinkName is the name of the link that carries what member from
// sends to (or fetches from) member to.
func PeerLinkName(from, to string) string { return from + ">member:" + to }

// NewPeerLinks makes a front for each member: pkiDir holds ca.crt and
// MEMBER.crt/MEMBER.key for each; target(member) is where the member
// listens for its peers. Addr(member) is the peer URL to advertise.
func NewPeerLinks(pkiDir string, members []string, target func(member string) string) (*PeerLinks, error) {
	caPEM, err := os.ReadFile(filepath.Join(pkiDir, "ca.crt"))
	if err != nil {
		return nil, fmt.Errorf("soak: peer links: %w", err)
	}
	p := &PeerLinks{roots: x509.NewCertPool(), certs: map[string]tls.Certificate{}, fronts: map[string]*peerFront{}, links: map[string]*Link{}}
	if !p.roots.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("soak: peer links: no CA certificate in %s", pkiDir)
	}
	for _, m := range members {
		c, err := tls.LoadX509KeyPair(filepath.Join(pkiDir, m+".crt"), filepath.Join(pkiDir, m+".key"))
		if err != nil {
			return nil, fmt.Errorf("soak: peer links: %s: %w", m, err)
		}
		p.certs[m] = c
		for _, o := range members {
			if o != m {
				p.links[PeerLinkName(m, o)] = newPairLink(PeerLinkName(m, o))
			}
		}
	}
	for _, m := range members {
		lis, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			_ = p.Close()
			return nil, fmt.Errorf("soak: peer links: %s: %w", m, err)
		}
		f := &peerFront{name: m, lis: lis, target: func() string { return target(m) }, p: p}
		p.fronts[m] = f
		f.wg.Add(1)
		go f.accept()
	}
	return p, nil
}

// Addr is the address of member's front: its advertised peer URL's host.
func (p *PeerLinks) Addr(member string) string { return p.fronts[member].lis.Addr().String() }

// Links are the links, by name.
func (p *PeerLinks) Links() map[string]*Link { return p.links }

// Isolate sets every link between member and the others, both ways.
func (p *PeerLinks) Isolate(member string, s LinkState) {
	for _, n := range p.memberLinks(member) {
		p.links[n].Set(s)
	}
}

// memberLinks are the names of member's links, both ways, sorted.
func (p *PeerLinks) memberLinks(member string) []string {
	var out []string
	for o := range p.fronts {
		if o != member {
			out = append(out, PeerLinkName(member, o), PeerLinkName(o, member))
		}
	}
	sort.Strings(out)
	return out
}

// Close stops the fronts and every link.
func (p *PeerLinks) Close() error {
	for _, f := range p.fronts {
		_ = f.lis.Close()
	}
	for _, l := range p.links {
		_ = l.Close()
	}
	for _, f := range p.fronts {
		f.wg.Wait()
	}
	return nil
}

func (f *peerFront) accept() {
	defer f.wg.Done()
	for {
		in, err := f.lis.Accept()
		if err != nil {
			return
		}
		go f.serve(in)
	}
}

// serve ends the caller's TLS, names the caller by its certificate and
// hands the connection to that direction's link, which dials the member
// with the caller's certificate.
func (f *peerFront) serve(raw net.Conn) {
	in := tls.Server(raw, &tls.Config{
		Certificates: []tls.Certificate{f.p.certs[f.name]},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    f.p.roots,
		MinVersion:   tls.VersionTLS13,
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	err := in.HandshakeContext(ctx)
	cancel()
	if err != nil {
		reset(raw)
		return
	}
	from := in.ConnectionState().PeerCertificates[0].Subject.CommonName
	l, ok := f.p.links[PeerLinkName(from, f.name)]
	cert, known := f.p.certs[from]
	if !ok || !known {
		reset(in) // not a member: the member would refuse it too
		return
	}
	l.serve(in, func() (net.Conn, error) {
		d := tls.Dialer{Config: &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: f.p.roots, MinVersion: tls.VersionTLS13},
			NetDialer: &net.Dialer{Timeout: 5 * time.Second}}
		return d.Dial("tcp", f.target())
	})
}
