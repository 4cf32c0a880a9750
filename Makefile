# Two entry points do all set-up: `make run` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	scripts/bootstrap.sh $(VENV)
	@touch $(STAMP)

.PHONY: run test lint bench
run: $(STAMP)  ## run the proxy on :8080 with config.example.yaml
	$(VENV)/bin/mitmdump -s addons/router.py --set router_config=$${CONFIG:-config.example.yaml} $(ARGS)

test: $(STAMP)  ## run every test (unit, end-to-end, bench smoke)
	$(PY) -m pytest $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) scripts/bench.py $(ARGS)
