# liverseg: `make reproduce` runs the pipeline, `make test` runs the tests.
# Both install what they need: a project-local .venv with torch 2.13.0 (the
# libtorch tch 0.26 is built against) and a release build linked with an rpath.

SHELL := /bin/bash
VENV := $(CURDIR)/.venv
TORCH_VERSION := 2.13.0
export VIRTUAL_ENV := $(VENV)
export PATH := $(VENV)/bin:$(PATH)
export LIBTORCH_USE_PYTORCH := 1
BIN := target/release/liverseg
CARGO_FLAGS := --release --locked

.PHONY: reproduce test bench build venv clean-artifacts report-check chromium

reproduce: build
	$(BIN) run

test: build chromium
	cargo test $(CARGO_FLAGS) --workspace -- --test-threads=1

# Render the current report in headless Chromium, check every image loads,
# and write a screenshot to report.png.
report-check: build chromium
	bash tests/scripts/render_report.sh "$$($(BIN) path report -q)/report.html" report.png

# The report render check needs Debian's chromium; install it when missing.
chromium:
	@command -v chromium >/dev/null || apt-get install -y -q chromium >/dev/null || \
	  (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null) || \
	  echo "warning: could not install chromium; the report render check will be skipped"

build: venv
	cargo build $(CARGO_FLAGS) --workspace

# The torch wheel carries libtorch; pip pulls it from PyPI once.
venv: $(VENV)/.torch-$(TORCH_VERSION)

$(VENV)/.torch-$(TORCH_VERSION):
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check torch==$(TORCH_VERSION)
	touch $@

bench: build
	bash bench/run.sh

clean-artifacts:
	rm -rf artifacts/*/ artifacts/.tmp artifacts/.scratch
