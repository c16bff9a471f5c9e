package emuhost_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"testing"
	"time"

	"github.com/google/go-attestation/attest"
	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"github.com/vtpmm/vtpmm/internal/fixtures"
	"github.com/vtpmm/vtpmm/vtpm"
	"github.com/vtpmm/vtpmm/vtpm/emuhost"
)

func startHost(t *testing.T, name string) *emuhost.Host {
	t.Helper()
	if err := emuhost.Available(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	h, err := emuhost.Start(ctx, emuhost.Config{Dir: t.TempDir(), Name: name})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := h.Stop(ctx); err != nil {
			t.Errorf("stop %s: %v", name, err)
		}
	})
	t.Logf("host %s: provisioning (swtpm_setup incl. CA creation) took %v", name, h.ProvisionTime())
	return h
}

func open(t *testing.T, h *emuhost.Host) transport.TPMCloser {
	t.Helper()
	tpm, err := vtpm.Open(context.Background(), h.URI())
	if err != nil {
		t.Fatal(err)
	}
	return tpm
}

func readNV(t *testing.T, tpm transport.TPM, idx tpm2.TPMHandle) []byte {
	t.Helper()
	pub, err := tpm2.NVReadPublic{NVIndex: idx}.Execute(tpm)
	if err != nil {
		t.Fatalf("NV_ReadPublic(%#x): %v", idx, err)
	}
	c, err := pub.NVPublic.Contents()
	if err != nil {
		t.Fatal(err)
	}
	var out []byte
	for off := uint16(0); off < c.DataSize; {
		n := min(c.DataSize-off, 1024)
		r, err := tpm2.NVRead{
			AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
			NVIndex:    tpm2.NamedHandle{Handle: idx, Name: pub.NVName},
			Size:       n, Offset: off,
		}.Execute(tpm)
		if err != nil {
			t.Fatalf("NV_Read(%#x): %v", idx, err)
		}
		out = append(out, r.Data.Buffer...)
		off += n
	}
	return out
}

func readPCR(t *testing.T, tpm transport.TPM, alg tpm2.TPMAlgID, pcr int) []byte {
	t.Helper()
	r, err := tpm2.PCRRead{PCRSelectionIn: tpm2.TPMLPCRSelection{PCRSelections: []tpm2.TPMSPCRSelection{
		{Hash: alg, PCRSelect: tpm2.PCClientCompatible.PCRs(uint(pcr))},
	}}}.Execute(tpm)
	if err != nil {
		t.Fatalf("PCR_Read(%v, %d): %v", alg, pcr, err)
	}
	if len(r.PCRValues.Digests) != 1 {
		t.Fatalf("PCR_Read(%v, %d): %d digests (bank not allocated?)", alg, pcr, len(r.PCRValues.Digests))
	}
	return r.PCRValues.Digests[0].Buffer
}

func cryptoHash(t *testing.T, alg tpm2.TPMAlgID) crypto.Hash {
	t.Helper()
	h, err := alg.Hash()
	if err != nil {
		t.Fatal(err)
	}
	return h
}

func readFile(t *testing.T, name string) []byte {
	t.Helper()
	b, err := fixtures.File("eventlogs/" + name)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// Ground truth (see internal/fixtures/SOURCES.md): PCRs quoted by a real GCE TPM for
// the COS log, and recorded values for the Debian 10 legacy log.
var (
	cosQuoted = map[tpm2.TPMAlgID][]string{
		tpm2.TPMAlgSHA1: {"c032c3b51dbb6f96b047421512fd4b4dfde496f3", "e3e9e1d9deacd95b289bbbd3a1717a57af7d211b", "b2a83b0ebf2f8374299a5b2bdfc31ea955ad7236",
			"b2a83b0ebf2f8374299a5b2bdfc31ea955ad7236", "6168c9ce88a8658920f2cf2f9012d3c6bbfab79b", "4099f70ab5a4171fe8cc11b5f23bc980ef272336",
			"b2a83b0ebf2f8374299a5b2bdfc31ea955ad7236", "42e669233f0e826df5093abfd6998c020df2de88", "72778b0ba3c491db25eb7c8368cb1fb51f0ce458",
			"f43c10ad862c39aee3f99fa270b91472533bae5f"},
		tpm2.TPMAlgSHA256: {"0f35c214608d93c7a6e68ae7359b4a8be5a0e99eea9107ece427c4dea4e439cf", "6eb40f5b6bfafcb9914d486ce59404acd24bc13a6a3c45cda3b44c9d7053d638",
			"3d458cfe55cc03ea1f443f1562beec8df51c75e14a9fcf9a7234a13f198e7969", "3d458cfe55cc03ea1f443f1562beec8df51c75e14a9fcf9a7234a13f198e7969",
			"d690bdac2aa8b73a1d718cb91990df07d0747b07ea57b3b2d0f0d511f0d90491", "158cd54b4f5f440d1a4da99da68fce2b1576eb8e2f18af2c3d9f96463f28d04e",
			"3d458cfe55cc03ea1f443f1562beec8df51c75e14a9fcf9a7234a13f198e7969", "3365d7fa2b024c852913c06e04ffbfa6ea5289f743bbf1a76f7ffdf21ed84793",
			"9e9b6511ae6ad443aae4c7bf998ffffbcd271c874f1efab9d692f129eb6e6c18", "e01c8cf808763422c5ede2cdb34595b92bd7d06b8bbd6014b54d2e95b14b0963"},
		tpm2.TPMAlgSHA384: {"46ce251b0b5b3da7917c5eb7a72e6e88f8f830445b149937921b095c1fd628db691963861c1153aba9c7097ff1c747f9",
			"844d7108d3a3b5de969355e20cb4d6b7ca14d287f0dbb81883ed0d1f6372a61715c69d5c6ad02e881297ae5c063273a1",
			"518923b0f955d08da077c96aaba522b9decede61c599cea6c41889cfbea4ae4d50529d96fe4d1afdafb65e7f95bf23c4",
			"518923b0f955d08da077c96aaba522b9decede61c599cea6c41889cfbea4ae4d50529d96fe4d1afdafb65e7f95bf23c4",
			"7f3a5eb37191b396b74e0b941bc90d0775e9ea0af7b47048c19c40f58d81e8a0c95686c48ebcafb76600d3cc89bdad23",
			"8b76ff943a11e442cb221d500780cdf1e549ed7209d59de86f51194880976a8ba343911a17a0a228de8901c2ff77ff40",
			"518923b0f955d08da077c96aaba522b9decede61c599cea6c41889cfbea4ae4d50529d96fe4d1afdafb65e7f95bf23c4",
			"1d89e5eb741702ee7c2eb73aa84fdcfa5fa279ad5c1fc428b694575198afb6ddf83c6ce1a06b2c563efbf840a2cead63",
			"f97c3aaae273a2758fc1595ac99c77425f896520914a3482158970dfb49f9e1106f9ce6b2465ec2865e976c8ab81c6e4",
			"25bb55977c44a0eb38fdaf6f4c2fc4cda23c20bc89ada9399f52908d0ba7342f28c2ba3e953ab1786273f90be0e8447c"},
	}
	debianRecorded = map[tpm2.TPMAlgID][]string{
		tpm2.TPMAlgSHA1: {"0f2d3a2a1adaa479aeeca8f5df76aadc41b862ea", "b1676439cac1531683990fefe2218a43239d6fe8", "b2a83b0ebf2f8374299a5b2bdfc31ea955ad7236",
			"b2a83b0ebf2f8374299a5b2bdfc31ea955ad7236", "1eb30816474a3f144e99b24e4ad480b2e51fd9e1", "019079179dbc0eb5992c500dcf8a095910ac590d",
			"b2a83b0ebf2f8374299a5b2bdfc31ea955ad7236", "9e6c57e850f371c2a7fe02bca552149363952318"},
	}
)

func TestBootReplaysRealEventLog(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, log string
		want      map[tpm2.TPMAlgID][]string
	}{
		{"crypto-agile sha1+sha256+sha384 (GCE COS 85)", "gce-cos-85.eventlog.bin", cosQuoted},
		{"legacy sha1 (GCE Debian 10)", "debian-10.bin", debianRecorded},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			h := startHost(t, "boot")
			log := readFile(t, tc.log)
			if err := h.Boot(context.Background(), log); err != nil {
				t.Fatal(err)
			}
			tpm := open(t, h)
			defer tpm.Close()
			var pcrs []attest.PCR
			for alg, vals := range tc.want {
				for i, v := range vals {
					got := readPCR(t, tpm, alg, i)
					if hex.EncodeToString(got) != v {
						t.Errorf("%v PCR %d = %x, want %s", alg, i, got, v)
					}
					pcrs = append(pcrs, attest.PCR{Index: i, Digest: got, DigestAlg: cryptoHash(t, alg)})
				}
			}
			// Independent replay of the log by go-attestation against what the TPM holds now.
			el, err := attest.ParseEventLog(log)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := el.Verify(pcrs); err != nil {
				t.Errorf("go-attestation replay does not match the booted PCRs: %v", err)
			}
			// A reboot resets the PCRs; the URI stays the same.
			tpm.Close()
			uri := h.URI()
			if err := h.Restart(context.Background()); err != nil {
				t.Fatal(err)
			}
			if h.URI() != uri {
				t.Errorf("URI changed across Restart: %s -> %s", uri, h.URI())
			}
			tpm2c := open(t, h)
			defer tpm2c.Close()
			if got := readPCR(t, tpm2c, tpm2.TPMAlgSHA1, 0); !bytes.Equal(got, make([]byte, 20)) {
				t.Errorf("PCR 0 after Restart = %x, want zeros", got)
			}
		})
	}
}

func TestBootRefusesMissingBank(t *testing.T) {
	t.Parallel()
	if err := emuhost.Available(); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	h, err := emuhost.Start(ctx, emuhost.Config{Dir: t.TempDir(), Name: "sha256only", PCRBanks: []string{"sha256"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = h.Stop(context.Background()) })
	err = h.Boot(ctx, readFile(t, "debian-10.bin"))
	if !errors.Is(err, emuhost.ErrEventLog) {
		t.Fatalf("Boot(sha1 log) on a sha256-only TPM = %v, want ErrEventLog", err)
	}
	t.Logf("refusal: %v", err)
}

type ekInfo struct {
	rsa, ecc *x509.Certificate
	root     []byte
}

func checkEKs(t *testing.T, h *emuhost.Host) ekInfo {
	t.Helper()
	caPEM, err := h.CACertPEM()
	if err != nil {
		t.Fatal(err)
	}
	var cas []*x509.Certificate
	for rest := caPEM; ; {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		cas = append(cas, c)
	}
	if len(cas) != 2 {
		t.Fatalf("CACertPEM holds %d certificates, want root + intermediate", len(cas))
	}
	roots, inter := x509.NewCertPool(), x509.NewCertPool()
	roots.AddCert(cas[0])
	inter.AddCert(cas[1])

	tpm := open(t, h)
	defer tpm.Close()
	info := ekInfo{root: cas[0].Raw}
	for _, tc := range []struct {
		nv     tpm2.TPMHandle
		handle tpm2.TPMHandle
		dst    **x509.Certificate
	}{{0x01c00002, 0x81010001, &info.rsa}, {0x01c00016, 0x81010016, &info.ecc}} {
		der := readNV(t, tpm, tc.nv)
		cert, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatalf("EK cert in NV %#x: %v", tc.nv, err)
		}
		// TCG EK certificates have an empty subject and a critical SAN with
		// the TPM's identity, which crypto/x509 does not handle.
		var unhandled []string
		for _, o := range cert.UnhandledCriticalExtensions {
			if o.String() != "2.5.29.17" {
				unhandled = append(unhandled, o.String())
			}
		}
		cert.UnhandledCriticalExtensions = nil
		if len(unhandled) > 0 {
			t.Errorf("EK cert %#x: unexpected critical extensions %v", tc.nv, unhandled)
		}
		if _, err := cert.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
			t.Errorf("EK cert %#x does not chain to the host CA: %v", tc.nv, err)
		}
		// The certificate certifies the EK that is in the TPM.
		rp, err := tpm2.ReadPublic{ObjectHandle: tc.handle}.Execute(tpm)
		if err != nil {
			t.Fatal(err)
		}
		pub, err := rp.OutPublic.Contents()
		if err != nil {
			t.Fatal(err)
		}
		switch k := cert.PublicKey.(type) {
		case *rsa.PublicKey:
			u, _ := pub.Unique.RSA()
			if k.N.BitLen() != 2048 || !bytes.Equal(k.N.Bytes(), u.Buffer) {
				t.Errorf("RSA EK cert does not match the EK at %#x", tc.handle)
			}
		case *ecdsa.PublicKey:
			u, _ := pub.Unique.ECC()
			if k.Curve != elliptic.P384() || !bytes.Equal(k.X.FillBytes(make([]byte, 48)), u.X.Buffer) {
				t.Errorf("ECC EK cert does not match the P-384 EK at %#x", tc.handle)
			}
		default:
			t.Errorf("EK cert %#x: unexpected key %T", tc.nv, k)
		}
		*tc.dst = cert
	}
	return info
}

func TestEKCertificatesChainToOwnCA(t *testing.T) {
	t.Parallel()
	a, b := startHost(t, "host-a"), startHost(t, "host-b")
	ia, ib := checkEKs(t, a), checkEKs(t, b)
	if bytes.Equal(ia.root, ib.root) {
		t.Error("two hosts share a CA root")
	}
	if bytes.Equal(ia.rsa.RawSubjectPublicKeyInfo, ib.rsa.RawSubjectPublicKeyInfo) ||
		bytes.Equal(ia.ecc.RawSubjectPublicKeyInfo, ib.ecc.RawSubjectPublicKeyInfo) {
		t.Error("two hosts share an EK")
	}
	// Host b's EK does not chain to host a's CA.
	if err := ia.rsa.CheckSignatureFrom(ib.rsa); err == nil {
		t.Error("unexpected cross signature")
	}
	pa, err := a.CACertPEM()
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(pa)
	if _, err := ib.rsa.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err == nil {
		t.Error("host b's EK cert verifies under host a's CA")
	}
}

func TestStopIsIdempotentAndStateSurvives(t *testing.T) {
	t.Parallel()
	h := startHost(t, "stop")
	ctx := context.Background()
	if err := h.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if h.Running() {
		t.Fatal("running after Stop")
	}
	if err := h.Stop(ctx); err != nil {
		t.Fatalf("second Stop: %v", err)
	}
	// Starting again on the same Dir reuses the manufactured state.
	h2, err := emuhost.Start(ctx, emuhost.Config{Dir: h.Dir(), Name: "stop"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = h2.Stop(context.Background()) })
	if h2.ProvisionTime() != 0 {
		t.Error("state was manufactured again")
	}
	checkEKs(t, h2)
}

func TestStartErrors(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		cfg  emuhost.Config
		want error
	}{
		{"no dir", emuhost.Config{Name: "x"}, emuhost.ErrBadConfig},
		{"no name", emuhost.Config{Dir: t.TempDir()}, emuhost.ErrBadConfig},
		{"comma in dir", emuhost.Config{Dir: t.TempDir() + "/a,b", Name: "x"}, emuhost.ErrBadConfig},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, err := emuhost.Start(context.Background(), tc.cfg)
			if !errors.Is(err, tc.want) {
				t.Fatalf("Start = %v, want %v", err, tc.want)
			}
		})
	}
}
