# The two newcomer commands: `make run` (demo on the embedded data) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel of torch; an unpinned torch pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: run test test-vision lint clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "posthoc needs Python >= 3.11; set PYTHON=/path/to/python3.11")'
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e .
	touch $@

# The docs extra lets the suite build the site strictly (tests/docs).
# curvlinops is the reference for the KFAC tests; --no-deps keeps the CPU torch.
CURVLINOPS := curvlinops-for-pytorch==3.0.1 einconv==0.1.0 linear_operator==0.6.1

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[test,hf,docs]'
	$(BIN)/python -m pip install -q --no-deps $(CURVLINOPS)
	touch $@

run: $(VENV)/.installed
	$(BIN)/posthoc demo

# ruff (pyflakes, bugbear, isort, pydocstyle) and mypy, configured in pyproject.toml.
lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest
	$(MAKE) test-vision

# The model-zoo tests on torchvision models, in a second environment at the top of the supported torch range:
# torchvision's wheel needs the CUDA build of torch (2.14.1, several GB from the local package disk; it runs on
# CPU), which the CPU 2.13.0 wheel of .venv cannot load. The main suite skips these tests.
VISION_VENV := .venv-vision
VISION_BIN := $(VISION_VENV)/bin

$(VISION_BIN)/python:
	$(PYTHON) -m venv $(VISION_VENV)

$(VISION_VENV)/.installed-test: $(VISION_BIN)/python pyproject.toml
	$(VISION_BIN)/python -m pip install -q --upgrade pip
	$(VISION_BIN)/python -m pip install -q -e '.[test,vision]'
	$(VISION_BIN)/python -m pip install -q --no-deps $(CURVLINOPS)
	touch $@

# The import first: a broken torchvision must fail here, not skip the tests.
test-vision: $(VISION_VENV)/.installed-test
	$(VISION_BIN)/python -c 'import torchvision'
	$(VISION_BIN)/python -m pytest tests/zoo/test_torchvision.py

# The documentation site (MkDocs Material + mkdocstrings, the docs extra) into site/; open site/index.html.
$(VENV)/.installed-docs: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[docs]'
	touch $@

.PHONY: docs
docs: $(VENV)/.installed-docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d site

clean:
	rm -rf $(VENV) $(VISION_VENV) runs .pytest_cache site
