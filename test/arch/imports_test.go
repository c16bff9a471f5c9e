package arch

import (
	"bytes"
	"encoding/json"
	"io"
	"strings"
	"testing"
)

const module = "github.com/vtpmm/vtpmm"

// layer is a package's place in the tree (docs/architecture.md), bottom
// first: a package may import packages of its own layer or below, never
// above.
func layer(pkg string) (int, string) {
	p := strings.TrimPrefix(pkg, module+"/")
	switch {
	case strings.HasPrefix(p, "internal/"):
		return 0, "leaf (internal/*)"
	case p == "attest":
		return 1, "attest"
	case p == "vtpm" || strings.HasPrefix(p, "vtpm/"):
		return 2, "vtpm/..."
	case p == "hypervisor":
		return 3, "hypervisor"
	case strings.HasPrefix(p, "hypervisor/"):
		return 4, "hypervisor implementation"
	case p == "migrate/wire":
		return 6, "migrate/wire"
	case p == "migrate" || strings.HasPrefix(p, "migrate/"):
		// migrate and the concerns big enough for a package of their own
		// (the registry, escrow, ...): one layer.
		return 5, "migrate"
	case p == "cmd/vtpmd/daemon":
		return 7, "daemon"
	case strings.HasPrefix(p, "cmd/") || p == "packaging":
		return 8, "command"
	case strings.HasPrefix(p, "test/"):
		return 9, "test harness"
	}
	return -1, "unknown"
}

type listedPackage struct {
	ImportPath string
	Imports    []string
	CgoFiles   []string
	Deps       []string
}

// packages lists every package of the module (not its tests) with its
// imports and all its dependencies.
func packages(t *testing.T) []listedPackage {
	t.Helper()
	out := goCmd(t, nil, "list", "-tags", "e2e", "-json", "./...")
	var pkgs []listedPackage
	dec := json.NewDecoder(bytes.NewReader([]byte(out)))
	for {
		var p listedPackage
		if err := dec.Decode(&p); err == io.EOF {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		pkgs = append(pkgs, p)
	}
	if len(pkgs) < 30 {
		t.Fatalf("go list found %d packages", len(pkgs))
	}
	return pkgs
}

// TestImportRules walks the module's import graph and fails on an import
// that runs upward, on a cgo backend imported outside the composition root,
// and on attest depending on cgo, libvirt or the TPM-holding side.
func TestImportRules(t *testing.T) {
	pkgs := packages(t)
	cgo := map[string]bool{}
	for _, p := range pkgs {
		if len(p.CgoFiles) > 0 {
			cgo[p.ImportPath] = true
		}
	}
	for _, p := range pkgs {
		l, name := layer(p.ImportPath)
		if l < 0 {
			t.Errorf("%s has no layer in docs/architecture.md (test/arch)", p.ImportPath)
			continue
		}
		for _, imp := range p.Imports {
			if !strings.HasPrefix(imp, module+"/") {
				continue
			}
			il, iname := layer(imp)
			if il > l {
				t.Errorf("%s (%s) imports %s (%s), a layer above it", p.ImportPath, name, imp, iname)
			}
			rel := strings.TrimPrefix(p.ImportPath, module+"/")
			switch strings.TrimPrefix(imp, module+"/") {
			case "hypervisor/libvirt":
				if rel != "cmd/vtpmd" && !strings.HasPrefix(rel, "test/") {
					t.Errorf("%s imports hypervisor/libvirt (cgo): only the composition root cmd/vtpmd and test/* may", p.ImportPath)
				}
			case "hypervisor/fake", "vtpm/tpmsim", "vtpm/tpmtest":
				if !strings.HasPrefix(rel, "test/") {
					t.Errorf("%s imports %s, which only tests and test/* may", p.ImportPath, imp)
				}
			}
			if strings.HasPrefix(rel, "cmd/") && strings.HasPrefix(strings.TrimPrefix(imp, module+"/"), "test/") {
				t.Errorf("%s imports %s: nothing under cmd/ imports test/", p.ImportPath, imp)
			}
		}
		if p.ImportPath == module+"/attest" {
			// No cgo outside the standard library, and it builds without cgo.
			if out := strings.TrimSpace(goCmd(t, nil, "list", "-deps", "-f", "{{if and (not .Standard) .CgoFiles}}{{.ImportPath}}{{end}}", "./attest")); out != "" {
				t.Errorf("attest depends on cgo packages: %s", out)
			}
			goCmd(t, []string{"CGO_ENABLED=0"}, "build", "./attest")
			for _, d := range p.Deps {
				switch {
				case cgo[d]:
					t.Errorf("attest depends on cgo (%s)", d)
				case strings.Contains(d, "libvirt"), strings.HasPrefix(d, module+"/vtpm"), strings.HasPrefix(d, module+"/hypervisor"), strings.HasPrefix(d, module+"/migrate"):
					t.Errorf("attest depends on %s", d)
				}
			}
		}
	}
}

// TestLayerRuleCanFail: the rule catches an upward import and a cgo
// backend outside the composition root.
func TestLayerRuleCanFail(t *testing.T) {
	if a, _ := layer(module + "/migrate/wire"); a <= func() int { l, _ := layer(module + "/migrate"); return l }() {
		t.Fatal("migrate/wire is not above migrate")
	}
	if l, _ := layer(module + "/internal/pki"); l != 0 {
		t.Fatal("internal/pki is not a leaf")
	}
	if l, _ := layer(module + "/somewhere/new"); l != -1 {
		t.Fatal("an unknown package has a layer")
	}
}
