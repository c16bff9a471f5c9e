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
TEST_TIMEOUT ?= 30m
BENCHTIME ?= 5x
BENCH_PKGS ?= ./vtpm/host/ ./attest/ ./vtpm/identity/ ./migrate/

.PHONY: all deps build test e2e e2e-bench evac-bench demo bench fuzz fuzz-smoke model soak vet fmt clean

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
	$(MAKE) --no-print-directory fuzz-smoke
	VTPMM_E2E_REQUIRE=1 $(GO) test -count=1 -tags e2e -timeout $(TEST_TIMEOUT) ./test/e2e/...

## e2e: end-to-end on real libvirtd + QEMU + swtpm hosts in network namespaces (root)
e2e: deps
	$(GO) test -count=1 -tags e2e -timeout $(TEST_TIMEOUT) ./test/e2e/...

## e2e-bench: vtpmctl migrate and virsh + vtpmm hook vs a plain virsh migrate with a pre-defined secret
## (fleet registry embedded unless E2E_BENCH_REGISTRY=none; KVM if /dev/kvm exists, else TCG; medians, ratios, downtime, TPM commands; table at the end, JSON in E2E_BENCH_JSON)
E2E_BENCH_ROUNDS ?=
E2E_BENCH_JSON ?= $(CURDIR)/$(BIN)/e2e-bench.json
E2E_BENCH_REGISTRY ?= embedded
e2e-bench: deps
	VTPMM_E2E_BENCH=1 VTPMM_E2E_REQUIRE=1 VTPMM_E2E_BENCH_ROUNDS=$(E2E_BENCH_ROUNDS) VTPMM_E2E_BENCH_JSON=$(E2E_BENCH_JSON) \
	  VTPMM_E2E_BENCH_REGISTRY=$(E2E_BENCH_REGISTRY) \
	  $(GO) test -count=1 -tags e2e -run '^TestE2EBench$$' -v -timeout 60m ./test/e2e/

## evac-bench: vtpmctl evacuate host-a (6 firmware-only VMs, parallel 3, registry embedded) vs the same
## VMs moved by plain parallel virsh migrate, side by side, EVAC_BENCH_ROUNDS rounds alternating which runs
## first; medians of wall times, per-round ratios and downtimes (reports numbers, never fails on timing);
## EVAC_BENCH_PLAIN_ORDER=grouped moves the plain VMs one destination after the other, as the batches do
EVAC_BENCH_ROUNDS ?= 4
EVAC_BENCH_PLAIN_ORDER ?= alternate
evac-bench: deps
	VTPMM_E2E_EVAC_BENCH=1 VTPMM_E2E_REQUIRE=1 VTPMM_E2E_EVAC_ROUNDS=$(EVAC_BENCH_ROUNDS) VTPMM_E2E_EVAC_PLAIN_ORDER=$(EVAC_BENCH_PLAIN_ORDER) \
	  $(GO) test -count=1 -tags e2e -run '^TestE2EEvacBench$$' -v -timeout 60m ./test/e2e/

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

## soak: randomized fault schedules on the in-process fleet (docs/soak.md) until SOAK_TIME has passed
## (or SOAK_SCHEDULES schedules ran), from SOAK_SEED (default: the time; a failing schedule prints its seed and
## history); prints a table. go test ./test/soak (part of make test) runs 2 fixed schedules.
SOAK_TIME ?= 10m
SOAK_SCHEDULES ?=
SOAK_STEPS ?=
SOAK_SEED ?= $(shell date +%s)
soak: deps
	@set -o pipefail; SOAK_TIME=$(SOAK_TIME) SOAK_SCHEDULES=$(SOAK_SCHEDULES) SOAK_STEPS=$(SOAK_STEPS) SOAK_SEED=$(SOAK_SEED) \
	  $(GO) test -count=1 -v -run '^TestSoak$$' -timeout 24h ./test/soak/ | tee soak.out | grep -E '^(=== RUN|\s*--- |PASS|FAIL|ok|\s+soak_test)|VIOLATED|replay:'; rc=$$?; \
	  echo; grep -o 'TABLE .*' soak.out | sed 's/^TABLE //'; exit $$rc

## fuzz: every fuzz target of the module for FUZZTIME each (docs/threat-model.md, Fuzzing). The
## packages are those whose tests declare a Fuzz function; each is built once with the fuzzer's
## coverage instrumentation (go test -c -fuzz), its targets are listed with -test.list '^Fuzz' and
## run from the package's directory with go test's fuzz cache. A crasher fails the run (after the
## other targets ran) and stays in the package's testdata/fuzz/TARGET/ as a regression input, which
## every go test runs from then on; fix the bug and commit the file. FUZZMINIMIZETIME is how long
## each new input (interesting or failing) is minimised: 0s (off) by default, since minimising takes
## most of a short run (FuzzAKCertificate, 15s: 77083 execs off, 5265 at 1s, about 20 at 5s); set it
## (e.g. FUZZMINIMIZETIME=1m) to get a small crasher.
FUZZTIME ?= 30s
FUZZMINIMIZETIME ?= 0s
FUZZTIME_SMOKE ?= 2s
FUZZ_DIRS = $$(grep -rl --include='*_test.go' --exclude-dir=testdata --exclude-dir=.git '^func Fuzz' . | xargs -n1 dirname | sort -u)
fuzz: deps
	@bin=$$(mktemp -d); trap 'rm -rf $$bin' EXIT; cache=$$($(GO) env GOCACHE)/fuzz; n=0; failed=""; start=$$(date +%s); \
	for dir in $(FUZZ_DIRS); do \
	  pkg=$$(cd $$dir && $(GO) list .) && $(GO) test -c -fuzz . -o $$bin/fuzz.test $$dir || { failed="$$failed $$dir(build)"; continue; }; \
	  for f in $$(cd $$dir && $$bin/fuzz.test -test.list '^Fuzz'); do \
	    n=$$((n+1)); echo "fuzz $$pkg $$f ($(FUZZTIME))"; \
	    (cd $$dir && $$bin/fuzz.test -test.run '^$$' -test.fuzz "^$$f$$" -test.fuzztime $(FUZZTIME) -test.fuzzminimizetime $(FUZZMINIMIZETIME) -test.fuzzcachedir $$cache/$$pkg) 2>&1 | \
	      tee $$bin/out | grep -v -e '^fuzz: elapsed: .*gathering baseline' -e '^PASS$$'; \
	    if [ $${PIPESTATUS[0]} -ne 0 ]; then \
	      if grep -q 'context deadline exceeded' $$bin/out && ! grep -q -e 'Failing input written' -e 'failure while testing seed corpus' -e '^panic:' $$bin/out; then \
	        echo "fuzz: $$f: 'context deadline exceeded' without a failing input is Go's race at the end of -fuzztime (go.dev/issue/75804, fixed in Go 1.27): not counted as a failure"; \
	      else failed="$$failed $$dir:$$f"; fi; fi; \
	    e=$$(grep -o 'execs: [0-9]*' $$bin/out | tail -1); echo "$$pkg $$f $${e:-(seed and cached corpus only)}" >> $$bin/summary; done; done; \
	echo; cat $$bin/summary 2>/dev/null | sed 's|^github.com/vtpmm/vtpmm/||' | (column -t 2>/dev/null || cat); \
	echo "fuzz: $$n targets, $(FUZZTIME) each, $$(( $$(date +%s) - start )) s"; \
	if [ -n "$$failed" ]; then echo "fuzz: FAILED:$$failed (crashers in each package's testdata/fuzz/)"; exit 1; fi

## fuzz-smoke: every fuzz target for FUZZTIME_SMOKE (make test runs it; prints the total time)
fuzz-smoke:
	@$(MAKE) --no-print-directory fuzz FUZZTIME=$(FUZZTIME_SMOKE)

vet:
	$(GO) vet ./...

fmt:
	gofmt -w $$(git ls-files '*.go')

clean:
	rm -rf $(BIN)
