# vdrepl — see README.md. Targets:
#   make demo   set up and run a demo on this machine
#   make test   run every test (unit, crash, fuzz seeds, real clients, FUSE)
#   make bench  fio comparison against qemu-nbd, nbdkit, nbdfuse, then the replication benchmark (bench/)
#   make lint   gofmt, go vet, package dependency rules
#   make deps   install the Debian packages the tests and demo use (root)
#   make guest  fetch the guest test's Debian kernel, build its initramfs (scripts/guest.sh)

GO      ?= go
BIN     ?= bin/vdrepl
PKGS    := ./...

.PHONY: all build test unit lint deps demo bench bench-repl fuzz clean

all: build

build:
	$(GO) build -o $(BIN) ./cmd/vdrepl

deps:
	@scripts/install-deps.sh

test: deps lint
	$(GO) test -race -timeout 20m -count=1 $(PKGS)

unit:
	$(GO) test -race -count=1 ./journal/... ./internal/... ./blockdev/... ./daemon/...

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	  if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)
	@scripts/check-deps.sh

.PHONY: guest
guest: deps
	@scripts/guest.sh prepare

demo: deps build
	@scripts/demo.sh $(BIN)

bench: build
	@VDREPL=$(BIN) bench/fio.sh
	@VDREPL=$(BIN) bench/repl.sh

bench-repl: build
	@VDREPL=$(BIN) bench/repl.sh

fuzz:
	$(GO) test ./journal -run XXX -fuzz FuzzDecodeHeader -fuzztime 30s
	$(GO) test ./blockdev -run XXX -fuzz FuzzDecodeRequest -fuzztime 30s

clean:
	rm -rf bin bench/out
