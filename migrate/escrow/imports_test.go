package escrow

import (
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestNoTPMByConstruction: the package seals and opens bundles without a
// TPM (0 host TPM commands per backup by construction). It imports no TPM
// library, and of package vtpm it uses only the secret key type and the
// VM ID check, none of which touches a TPM (of vtpmm's other packages only
// internal/atomicfile, which writes files). Adding a TPM call here fails
// this test.
func TestNoTPMByConstruction(t *testing.T) {
	allowed := map[string]bool{"VMKey": true, "Sealer": true, "Sealed": true, "Binding": true, "Domain": true, "NewAEADSealer": true, "CheckVMID": true}
	files, _ := filepath.Glob("*.go")
	fset := token.NewFileSet()
	checked := 0
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		af, err := parser.ParseFile(fset, f, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		checked++
		for _, imp := range af.Imports {
			p, _ := strconv.Unquote(imp.Path.Value)
			// internal/atomicfile writes files and imports nothing of vtpmm.
			ours := strings.HasPrefix(p, "github.com/vtpmm/vtpmm/") && p != "github.com/vtpmm/vtpmm/vtpm" && p != "github.com/vtpmm/vtpmm/internal/atomicfile"
			if strings.Contains(p, "go-tpm") || strings.Contains(p, "go-attestation") || ours || p == "C" {
				t.Errorf("%s imports %s", f, p)
			}
		}
		ast.Inspect(af, func(n ast.Node) bool {
			if sel, ok := n.(*ast.SelectorExpr); ok {
				if id, ok := sel.X.(*ast.Ident); ok && id.Name == "vtpm" && !allowed[sel.Sel.Name] {
					t.Errorf("%s uses vtpm.%s", fset.Position(sel.Pos()), sel.Sel.Name)
				}
			}
			return true
		})
	}
	if checked < 5 {
		t.Fatalf("only %d files checked", checked)
	}
}
