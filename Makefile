# Two commands do all set-up on a fresh machine (see README.md):
#   make run    installs everything and runs the main job
#   make test   installs everything and runs the lint and the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: run test install data browser lint clean mpi

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) data browser

# Fashion-MNIST from Debian's dataset package, where apt exists and we may use it; elsewhere see README.
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
	  || echo "warning: could not install dataset-fashion-mnist; see README.md 'Data'"; \
	else echo "note: no apt as root here; see README.md 'Data' for Fashion-MNIST"; fi

# Debian's chromium for the live dashboard's browser test (tests/live), driven by Playwright through its
# executable path: Playwright's own browser download is not used. Without it that one test is skipped.
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "warning: could not install chromium; the live dashboard's browser test will be skipped"; \
	else echo "note: no apt as root here; install chromium for the live dashboard's browser test"; fi

# The MPI column of benchmarks/allreduce_busbw.py: MPICH (the mpich wheel: libmpi, mpiexec) through mpi4py.
# Benchmark-only: make test does not need it.
mpi: $(STAMP)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[mpi]'

run: install
	$(BIN)/distlearn bench --suite quick

lint: $(STAMP)
	$(BIN)/ruff check .

test: install lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
