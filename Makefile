# Two commands from nothing: `make demo` and `make test`. Both set everything up first and
# skip finished set-up on later runs.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.netcarve-installed
TORCH  := torch==2.13.0

.PHONY: setup system-deps demo test lint clean

setup: system-deps $(STAMP)

system-deps:
	@bash scripts/setup-system.sh

# torch goes in first and pinned, so nothing below can pull a newer (CUDA) build.
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[all,test]" "$(TORCH)"
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/netcarve demo --out out/demo

test: setup lint
	$(PY) -m pytest -q -n 2 --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff check netcarve tests bench

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
