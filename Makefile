# vdrepl — see README.md. Targets:
#   make demo   set up and run a demo on this machine
#   make test   run every test (unit, crash, fuzz seeds, real clients, FUSE)
#   make bench  fio comparison against qemu-nbd, nbdkit, nbdfuse, then the replication benchmark (bench/)
#   make lint   gofmt, go vet, package dependency rules
#   make deps   install the Debian packages the tests and demo use (root)
#   make guest  fetch the guest test's Debian kernel, build its initramfs (scripts/guest.sh)
#   make install  binary, systemd unit, config, bash completion (PREFIX, DESTDIR, SYSCONFDIR)

GO      ?= go
BIN     ?= bin/vdrepl
PKGS    := ./...

.PHONY: all build test unit lint deps demo bench bench-repl fuzz clean

all: build

# The version `vdrepl --version` prints: the git description of the tree.
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo devel)

build:
	$(GO) build -ldflags "-X main.version=$(VERSION)" -o $(BIN) ./cmd/vdrepl

deps:
	@scripts/install-deps.sh

test: deps lint
	$(GO) test -race -timeout 20m -count=1 $(PKGS)

unit:
	$(GO) test -race -count=1 ./journal/... ./internal/... ./blockdev/... ./daemon/... ./control/... ./failover/... ./relay/... ./quiesce/...

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

# make install [PREFIX=/usr/local] [DESTDIR=] [SYSCONFDIR=/etc]: the unit gets
# the installed paths. The config is installed from the example only when
# none exists; the binary reads /etc/vdrepl/vdrepl.toml unless --config or
# VDREPL_CONFIG says otherwise.
PREFIX        ?= /usr/local
BINDIR        ?= $(PREFIX)/bin
SYSCONFDIR    ?= /etc
UNITDIR       ?= $(PREFIX)/lib/systemd/system
DOCDIR        ?= $(PREFIX)/share/doc/vdrepl
COMPLETIONDIR ?= $(PREFIX)/share/bash-completion/completions

.PHONY: install uninstall
install: build
	install -D -m 0755 $(BIN) $(DESTDIR)$(BINDIR)/vdrepl
	install -d -m 0755 $(DESTDIR)$(UNITDIR)
	sed -e 's|/usr/local/bin/|$(BINDIR)/|g' -e 's|/etc/vdrepl/|$(SYSCONFDIR)/vdrepl/|g' \
	    -e 's|/usr/local/share/doc/vdrepl/|$(DOCDIR)/|g' scripts/vdrepl.service > $(DESTDIR)$(UNITDIR)/vdrepl.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/vdrepl.service
	install -D -m 0644 scripts/vdrepl-completion.bash $(DESTDIR)$(COMPLETIONDIR)/vdrepl
	install -D -m 0644 scripts/vdrepl.toml.example $(DESTDIR)$(DOCDIR)/vdrepl.toml.example
	install -D -m 0644 README.md $(DESTDIR)$(DOCDIR)/README.md
	install -D -m 0644 scripts/grafana-dashboard.json $(DESTDIR)$(DOCDIR)/grafana-dashboard.json
	install -D -m 0644 scripts/vdrepl-alerts.yml $(DESTDIR)$(DOCDIR)/vdrepl-alerts.yml
	@if [ -e $(DESTDIR)$(SYSCONFDIR)/vdrepl/vdrepl.toml ]; then \
	  echo "kept $(DESTDIR)$(SYSCONFDIR)/vdrepl/vdrepl.toml (the example is $(DOCDIR)/vdrepl.toml.example)"; \
	else install -D -m 0644 scripts/vdrepl.toml.example $(DESTDIR)$(SYSCONFDIR)/vdrepl/vdrepl.toml; fi
	@echo "next: systemctl daemon-reload && systemctl enable --now vdrepl"

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/vdrepl $(DESTDIR)$(UNITDIR)/vdrepl.service $(DESTDIR)$(COMPLETIONDIR)/vdrepl
	rm -rf $(DESTDIR)$(DOCDIR)
	@echo "kept $(DESTDIR)$(SYSCONFDIR)/vdrepl and /var/lib/vdrepl"

clean:
	rm -rf bin bench/out
