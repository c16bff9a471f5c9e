# vtpmm — make targets. Everything runs as root on Debian 12.
SHELL := /bin/bash
export PATH := /usr/local/go/bin:$(PATH)
export GOFLAGS := -buildvcs=false
GO ?= go
BIN := bin
# Debian packages the build, the tests and the demo need (installed without
# recommends: cgo needs gcc, libc6-dev and pkg-config explicitly; the guest
# image's kernel and busybox are fetched with apt-get download, not installed).
DEB_PKGS := swtpm swtpm-tools libssl-dev libvirt-dev libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients \
	qemu-system-x86 iproute2 ca-certificates git gcc libc6-dev pkg-config make curl spin
TEST_TIMEOUT ?= 20m
BENCHTIME ?= 5x
BENCH_PKGS ?= ./vtpm/host/ ./attest/ ./vtpm/identity/ ./migrate/

.PHONY: all deps build test e2e e2e-bench demo bench fuzz model vet fmt clean

all: build

## deps: install what is missing (idempotent, ~0.1 s when all is there)
deps:
	@missing=""; for p in $(DEB_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "deps: apt-get install$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
	@id -u libvirt-qemu >/dev/null 2>&1 || useradd -r -g libvirt-qemu -d /var/lib/libvirt -M -s /usr/sbin/nologin libvirt-qemu
	@command -v $(GO) >/dev/null || { echo "deps: Go 1.26 is required at /usr/local/go (https://go.dev/dl)"; exit 1; }
	@$(GO) mod download

## build: the binaries into ./bin
build: deps
	@mkdir -p $(BIN)
	$(GO) build -o $(BIN)/ ./cmd/vtpmd
	CGO_ENABLED=0 $(GO) build -o $(BIN)/ ./cmd/vtpmctl ./cmd/vtpmm-guest

## test: vet, every test on real swtpm processes, then the e2e suite on real libvirt (root)
test: deps
	@test -z "$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))" || { echo "gofmt needed:"; gofmt -l .; exit 1; }
	@$(GO) mod tidy -diff >/dev/null || { echo "go.mod/go.sum are not tidy (go mod tidy):"; $(GO) mod tidy -diff; exit 1; }
	$(GO) vet ./...
	$(GO) vet -tags e2e ./test/...
	VTPMM_E2E_REQUIRE=1 $(GO) test -count=1 -timeout $(TEST_TIMEOUT) ./...
	VTPMM_E2E_REQUIRE=1 $(GO) test -count=1 -tags e2e -timeout $(TEST_TIMEOUT) ./test/e2e/...

## e2e: end-to-end on real libvirtd + QEMU + swtpm hosts in network namespaces (root)
e2e: deps
	$(GO) test -count=1 -tags e2e -timeout $(TEST_TIMEOUT) ./test/e2e/...

## e2e-bench: vtpmctl migrate and virsh + vtpmm hook vs a plain virsh migrate with a pre-defined secret
## (KVM if /dev/kvm exists, else TCG; medians, ratios, downtime, TPM commands; table at the end, JSON in E2E_BENCH_JSON)
E2E_BENCH_ROUNDS ?=
E2E_BENCH_JSON ?= $(CURDIR)/$(BIN)/e2e-bench.json
e2e-bench: deps
	VTPMM_E2E_BENCH=1 VTPMM_E2E_REQUIRE=1 VTPMM_E2E_BENCH_ROUNDS=$(E2E_BENCH_ROUNDS) VTPMM_E2E_BENCH_JSON=$(E2E_BENCH_JSON) \
	  $(GO) test -count=1 -tags e2e -run '^TestE2EBench$$' -v -timeout 60m ./test/e2e/

## demo: the main job, end to end on libvirt hosts in network namespaces (root; last line: DEMO OK)
demo: build
	@$(GO) build -o $(BIN)/ ./test/lab/cmd/subreaper
	@$(GO) build -o $(BIN)/vtpmm-demo ./test/demo
	$(BIN)/vtpmm-demo --bin $(BIN)

## bench: TPM command counts and time under the none and dtpm profiles
bench: deps
	@set -o pipefail; $(GO) test -run '^$$' -bench . -benchtime $(BENCHTIME) $(BENCH_PKGS) | tee bench.out | $(GO) run ./internal/benchtable

## model: SPIN checks the protocol model (test/model/vtpmm.pml) in every configuration and refutes every
## mutation, one verification at a time (docs/model.md); prints a table. go test ./test/model runs a subset.
model: deps
	@set -o pipefail; VTPMM_MODEL_FULL=1 VTPMM_E2E_REQUIRE=1 $(GO) test -count=1 -v -timeout 30m ./test/model/ | tee model.out | grep -E '^(=== RUN|\s*--- |PASS|FAIL|ok)'; rc=$$?; \
	  echo; echo "| configuration | mutation | result | states | depth | time | verdict |"; echo "| --- | --- | --- | --- | --- | --- | --- |"; \
	  grep -o 'TABLE .*' model.out | sed 's/^TABLE //'; exit $$rc

## fuzz: run every fuzz target for FUZZTIME each
FUZZTIME ?= 10s
fuzz: deps
	@for pkg in $$($(GO) list ./...); do \
	  for f in $$($(GO) test -list '^Fuzz' $$pkg 2>/dev/null | grep '^Fuzz'); do \
	    echo "fuzz $$pkg $$f"; $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) $$pkg || exit 1; done; done

vet:
	$(GO) vet ./...

fmt:
	gofmt -w $$(git ls-files '*.go')

clean:
	rm -rf $(BIN)
