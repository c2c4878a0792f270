# yolo-fgd: `make demo` runs the main job end to end offline, `make test` runs the test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export YOLO_OFFLINE := 1
export YOLO_AUTOINSTALL := false
export YOLO_CONFIG_DIR := $(CURDIR)/.yolo_config
export YOLO_VERBOSE ?= True

.PHONY: demo test test-quick lint docs install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[dev,openvino]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/lint-imports

test: $(STAMP) lint docs
	$(BIN)/python -m pytest -q tests

# the documentation site, offline, --strict: a broken link, a missing page or anchor fails (build/site/)
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# the tier to run while working: everything that trains no model (a couple of minutes)
test-quick: $(STAMP) lint
	$(BIN)/python -m pytest -q -m "not slow" tests

demo: $(STAMP)
	$(BIN)/yolo-fgd demo

clean:
	rm -rf $(VENV) .yolo_config runs
