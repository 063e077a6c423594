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

.PHONY: reproduce test bench build venv clean-artifacts report-check chromium docs

reproduce: build
	$(BIN) run

# Two cargo invocations, as for the build: the engine side (without libtorch)
# and the libtorch side (the model crate and the worker).
ENGINE_PKGS := -p liverseg -p liverseg-engine -p liverseg-imaging -p liverseg-rng -p liverseg-metrics -p liverseg-search -p liverseg-recipe -p liverseg-stages
TORCH_PKGS := -p liverseg-model -p liverseg-torch

# The libtorch tests run with a single-node Slurm cluster up (started and
# stopped by tests/slurm/with_cluster.sh; skipped with a message without it).
test: build chromium
	cargo test $(CARGO_FLAGS) $(ENGINE_PKGS) -- --test-threads=1
	bash tests/slurm/with_cluster.sh cargo test $(CARGO_FLAGS) $(TORCH_PKGS) -- --test-threads=1

# Render the current report in headless Chromium, check every image loads,
# and write a screenshot to report.png.
report-check: build chromium
	bash tests/scripts/render_report.sh "$$($(BIN) path report -q)/report.html" report.png

# The report render check needs Debian's chromium; install it when missing.
chromium:
	@command -v chromium >/dev/null || apt-get install -y -q chromium >/dev/null || \
	  (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null) || \
	  echo "warning: could not install chromium; the report render check will be skipped"

# The engine binary and the worker in separate invocations, so that the
# worker's `torch` feature of liverseg-stages never reaches the engine binary.
build: venv
	cargo build $(CARGO_FLAGS) -p liverseg
	cargo build $(CARGO_FLAGS) -p liverseg-torch

# The torch wheel carries libtorch; pip pulls it from PyPI once.
venv: $(VENV)/.ready-torch-$(TORCH_VERSION)-dicom-s3-st-smp-pa

$(VENV)/.ready-torch-$(TORCH_VERSION)-dicom-s3-st-smp-pa:
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check torch==$(TORCH_VERSION)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check torch==$(TORCH_VERSION) nibabel highdicom safetensors "moto[server]" segmentation-models-pytorch==0.6.0 pyarrow
	touch $@

bench: build
	bash bench/run.sh

clean-artifacts:
	rm -rf artifacts/*/ artifacts/.tmp artifacts/.scratch

# docs/params.md (every stage key; a test checks it against the code) and
# the README's diagrams: the stage DAG and the crates (needs Graphviz's dot).
PARAMS_HEADER := \# liverseg parameters\n\nEvery key of every stage, generated from the code by `make docs` (`liverseg params --markdown`); tests/cli.rs checks this file is current.\n
docs: build
	printf '$(PARAMS_HEADER)' > docs/params.md
	$(BIN) params --markdown >> docs/params.md
	$(BIN) dag --dot > docs/dag.dot
	dot -Tsvg docs/dag.dot -o docs/dag.svg
	dot -Tsvg docs/crates.dot -o docs/crates.svg
