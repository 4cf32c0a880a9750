# Two entry points do all set-up: `make run` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	scripts/bootstrap.sh $(VENV)
	@touch $(STAMP)

.PHONY: run test lint bench bench-scaleout local-model local-model-stop test-local-model
run: $(STAMP)  ## run the proxy on :8080 with config.example.yaml
	$(VENV)/bin/mitmdump -s addons/router.py --set router_config=$${CONFIG:-config.example.yaml} $(ARGS)

test: $(STAMP)  ## run every test (unit, end-to-end, bench smoke)
	$(PY) -m pytest $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: $(STAMP)
	$(PY) scripts/bench.py $(ARGS)

bench-scaleout: $(STAMP)  ## req/s of 1..3 proxies behind HAProxy, the shared ledger's rows/s
	$(PY) scripts/bench_scaleout.py $(ARGS)

# A free local model for dev (llama.cpp's OpenAI-compatible server with Gemma 3 270M), in a venv
# of its own under .local-model/; the example config's `local-gemma` group routes to it.
local-model:  ## install (once: compiles llama.cpp) and start it on 127.0.0.1:8090
	scripts/local_model.sh start

local-model-stop:
	scripts/local_model.sh stop

test-local-model: $(STAMP)  ## plain and streamed requests to it through the proxy, and the spend log
	scripts/local_model.sh install
	$(PY) -m pytest tests/local_model $(ARGS)
