# Set-up is part of every target: on a fresh machine `make demo` or `make test` is all it takes.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast lint install clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# The CPU torch wheel first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q --no-compile torch==2.13.0
	# A resolved set of versions: without it pip backtracks for an hour over s3fs/boto3/ray releases.
	$(BIN)/pip install -q --no-compile -c constraints.txt -e '.[test]'
	# Byte-compile everything once, on all cores (pip would do it on one). It must happen here:
	# where PYTHONDONTWRITEBYTECODE is set (as on CI machines) nothing is cached at import, and every
	# Ray worker would compile torch and ray from source again (benchmarks/RESULTS.md, "Test suite and CI time").
	# -x: torch's test helpers include a file in Python 3.12 syntax, never imported by diffcut.
	$(BIN)/python -m compileall -q -j 0 -x '/torch/testing/_internal/py3[0-9]+_intrinsics\.py$$' $(VENV)/lib diffcut
	touch $@

install: $(VENV)/.installed

# Label the bundled sample images with the tiny random model (no download needed).
demo: $(VENV)/.installed
	$(BIN)/python jobs/label.py --input samples --output out/sample-labels --model tiny-random --device cpu \
		--resolution 256 --ncut-cpus 0.5 --extractor-cpus 0.5 --overwrite

# Two worker processes, each test file on one (module-scoped Ray and S3 fixtures stay per file): the
# Ray tests spend much of their time waiting on process start-ups, so two processes finish sooner even
# on 2 cores (benchmarks/RESULTS.md, "Test suite and CI time"). TEST_WORKERS=0 runs it in one process.
# The 15 slowest tests are listed at the end: where CI time goes, in every CI log.
TEST_WORKERS ?= 2

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --durations=15

# The inner loop: every test that needs neither Ray nor the S3 server (markers set in tests/conftest.py).
test-fast: $(VENV)/.installed
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not ray and not s3 and not slow"

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) out
