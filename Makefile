# packdebug is one Python file: nothing to build.  `make demo` and `make test`
# are the two commands a fresh Debian machine needs (both install what they
# use when run as root with apt-get available).

PYTHON ?= python3
VENV ?= .venv
PREFIX ?= /usr/local
DESTDIR ?=
PYTEST_ARGS ?= -q -W error::pytest.PytestUnraisableExceptionWarning

# Debian packages the demo and the tests use, with a command each provides.
DEB_TOOLS := gcc:gcc objcopy:binutils debugedit:debugedit xz:xz-utils bsdtar:libarchive-tools \
	debuginfod:debuginfod eu-readelf:elfutils i686-linux-gnu-gcc:gcc-i686-linux-gnu \
	powerpc-linux-gnu-gcc:gcc-powerpc-linux-gnu s390x-linux-gnu-gcc:gcc-s390x-linux-gnu \
	systemd-analyze:systemd zstd:zstd bzip2:bzip2 ss:iproute2 unshare:util-linux
DEB_EXTRA := libc6-dev libc6-dev-i386-cross libc6-dev-powerpc-cross libc6-dev-s390x-cross \
	python3-venv curl time

.PHONY: all test demo deps bench fuzz mutants install uninstall lint clean

all: test

deps:
	@missing=""; for pair in $(DEB_TOOLS); do \
		command -v "$${pair%%:*}" >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; \
	done; \
	[ -x /usr/bin/time ] || missing="$$missing time"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "installing:$$missing"; \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
				--no-install-recommends $$missing $(DEB_EXTRA); \
		else \
			echo "note: missing Debian packages:$$missing (tests that need them are skipped)"; \
		fi; \
	fi

# VENV_ARGS=--system-site-packages uses a pytest the system already has
# (Debian's python3-pytest in the sid chroot, which reaches no PyPI).
$(VENV)/.ready:
	$(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	$(VENV)/bin/python -c 'import pytest' 2>/dev/null || $(VENV)/bin/pip install -q pytest
	touch $@

test: deps $(VENV)/.ready
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS) test_packdebug.py

demo: deps
	@set -e; work=$$(mktemp -d); trap 'rm -rf "$$work"' EXIT; \
	echo "== building hello with -g and splitting it the estrip way into $$work/image"; \
	tests/estrip-image.sh "$$work/image"; \
	echo "== packdebug pack"; \
	$(PYTHON) packdebug.py pack --image "$$work/image" --category app-misc --pn hello \
		--pf hello-1.0 --build-id 1 -v; \
	tarball="$$work/image/usr/lib/debug/.tarball/app-misc/hello/hello-1.0-1-debug.tar.xz"; \
	echo "== packdebug list"; $(PYTHON) packdebug.py list "$$tarball"; \
	echo "== packdebug verify"; $(PYTHON) packdebug.py verify "$$tarball"; \
	echo "== xz -lvv (blocks)"; xz -lvv "$$tarball" | sed -n '/^  Blocks:$$/,/^  Memory/p'

# Long measurements, side by side with Portage's command and xz (see bench/bench.py).
bench: deps
	$(PYTHON) bench/bench.py $(BENCH_ARGS)

# 100,000 mutated ELF and 1,000 damaged tarballs, with counts per outcome.
fuzz: deps $(VENV)/.ready
	$(VENV)/bin/python tests/fuzz.py $(FUZZ_ARGS)

# Small bugs planted one at a time; prints the ones no test notices.
mutants: deps $(VENV)/.ready
	$(VENV)/bin/python tests/mutants.py $(MUTANTS_ARGS)

# packdebug.py goes to LIBDIR with its bytecode compiled, and bin/packdebug is
# a launcher that imports it: Python compiles a script at every start (about
# 80 ms for this one), a module only once.
LIBDIR ?= $(PREFIX)/lib/packdebug

install:
	install -D -m 0644 packdebug.py $(DESTDIR)$(LIBDIR)/packdebug.py
	$(PYTHON) -m compileall -q -d $(LIBDIR) $(DESTDIR)$(LIBDIR)/packdebug.py
	@python=$$(command -v $(PYTHON)); mkdir -p $(DESTDIR)$(PREFIX)/bin; \
	printf '%s\n' "#!$$python" \
		'import _signal; _signal.signal(_signal.SIGINT, _signal.SIG_DFL)  # quiet Ctrl-C' \
		'import sys' "sys.path.insert(0, '$(LIBDIR)')" \
		'import packdebug' 'sys.exit(packdebug.main())' > $(DESTDIR)$(PREFIX)/bin/packdebug; \
	chmod 0755 $(DESTDIR)$(PREFIX)/bin/packdebug; \
	echo "installed $(DESTDIR)$(PREFIX)/bin/packdebug, running $$python on $(LIBDIR)/packdebug.py"

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/packdebug
	rm -rf $(DESTDIR)$(LIBDIR)

lint: $(VENV)/.ready
	$(VENV)/bin/pip install -q ruff vermin
	$(VENV)/bin/ruff check packdebug.py test_packdebug.py bench/bench.py tests/*.py
	$(VENV)/bin/ruff format --check packdebug.py test_packdebug.py bench/bench.py tests/*.py
	$(VENV)/bin/vermin -t=3.9- --no-tips --violations packdebug.py

clean:
	rm -rf $(VENV) .venv-* .pytest_cache __pycache__ tests/__pycache__ bench-results
