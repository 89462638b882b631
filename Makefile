# Set-up is part of every target: on a fresh machine `make demo` or `make test` is all it takes.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# The CPU torch wheel first: an unpinned torch would pull a multi-GB CUDA build.
	# --no-compile: modules are byte-compiled when first imported, not all of them at install
	# (torch and ray bring thousands of files; CI has 20 minutes for install and tests).
	$(BIN)/pip install -q --no-compile torch==2.13.0
	# A resolved set of versions: without it pip backtracks for an hour over s3fs/boto3/ray releases.
	$(BIN)/pip install -q --no-compile -c constraints.txt -e '.[test]'
	touch $@

install: $(VENV)/.installed

# Label the bundled sample images with the tiny random model (no download needed).
demo: $(VENV)/.installed
	$(BIN)/python jobs/label.py --input samples --output out/sample-labels --model tiny-random --device cpu \
		--resolution 256 --ncut-cpus 0.5 --extractor-cpus 0.5 --overwrite

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) out
