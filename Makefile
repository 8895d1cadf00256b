# Two commands from nothing: `make demo` and `make test`. Both set everything up first and
# skip finished set-up on later runs.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.netcarve-installed
TORCH  := torch==2.13.0

# Debian packages: the data for everything, a browser for the diagram tests.
DEMO_DEBS := dataset-fashion-mnist
TEST_DEBS := dataset-fashion-mnist chromium chromium-driver

.PHONY: setup demo-deps test-deps demo test lint clean

setup: test-deps $(STAMP)

demo-deps:
	@bash scripts/setup-system.sh $(DEMO_DEBS)

test-deps:
	@bash scripts/setup-system.sh $(TEST_DEBS)

# torch goes in first and pinned, so nothing below can pull a newer (CUDA) build.
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[all,test]" "$(TORCH)"
	@touch $(STAMP)

demo: demo-deps $(STAMP)
	$(VENV)/bin/netcarve demo --out out/demo

test: test-deps $(STAMP) lint
	$(PY) -m pytest -q -n 2 --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff check netcarve tests bench

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
