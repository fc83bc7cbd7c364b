# megalite: the README's commands. `make demo` and `make test` install first when needed.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=
STAMP := build/.installed
# Hugging Face conversion (safetensors) and its tests (transformers); neither pulls in torch.
HF_PACKAGES := "safetensors==0.8.0" "transformers==5.24.0" "peft==0.21.2" "accelerate==1.15.0"
# Parquet and Arrow input of tools/preprocess.py (optional at run time; its tests need it).
DATA_PACKAGES := "pyarrow==26.0.1"

.PHONY: install demo finetune-demo test bench gpu-check lint format clean

# Installs torch only when none is importable (an existing CUDA build is never replaced),
# then the dependencies and megalite itself, building the kernels against that torch.
$(STAMP): setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*)
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "torch==$(TORCH_VERSION)"
	$(PYTHON) -m pip install numpy pyyaml sentencepiece tqdm psutil pytest tensorboard pybind11 ninja "setuptools>=64" wheel "matplotlib==3.11.2"
	$(PYTHON) -m pip install $(HF_PACKAGES)
	$(PYTHON) -m pip install $(DATA_PACKAGES)
	$(PYTHON) -m pip install --no-build-isolation -e .
	$(PYTHON) -m megalite.env
	@mkdir -p build && touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	bash launch/pretrain.sh

# LoRA fine-tuning of the demo's model on instructions from the standard library (runs the
# demo first when its checkpoint is missing); prints a held-out answer before and after.
finetune-demo: $(STAMP)
	$(PYTHON) tools/finetune_demo.py

test: $(STAMP)
	$(PYTHON) -m pytest -q tests $(PYTEST_ARGS)

bench: $(STAMP)
	$(PYTHON) tools/bench/kernels.py
	$(PYTHON) tools/bench/train_step.py
	$(PYTHON) tools/bench/preprocess.py
	$(PYTHON) tools/bench/preprocess.py --near-dedup
	$(PYTHON) tools/bench/tensor_parallel.py
	$(PYTHON) tools/bench/pipeline.py
	$(PYTHON) tools/bench/data_parallel.py
	$(PYTHON) tools/bench/timers.py
	$(PYTHON) tools/bench/zero.py

# Everything that needs a GPU, in one command and one markdown report (tools/gpu_check.py): it
# builds the kernels in place against the installed torch, so it needs no install step (none that
# could replace a CUDA torch) and no network. Without CUDA it prints one line and succeeds.
REPORT ?= gpu-check.md
GPU_CHECK_ARGS ?=

gpu-check:
	$(PYTHON) tools/gpu_check.py --report $(REPORT) $(GPU_CHECK_ARGS)

# What CI checks besides the tests (ruff and clang-format come from PyPI, pinned).
LINT_TOOLS := ruff==0.17.6 clang-format==23.1.3
CSRC := $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.cpp csrc/cuda/*.h)

lint:
	@$(PYTHON) -m ruff --version >/dev/null 2>&1 && clang-format --version >/dev/null 2>&1 || $(PYTHON) -m pip install -q $(LINT_TOOLS)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	clang-format --style=file:csrc/.clang-format --dry-run --Werror $(CSRC)

format:
	$(PYTHON) -m ruff format .
	clang-format --style=file:csrc/.clang-format -i $(CSRC)

clean:
	rm -rf build megalite/*.so *.egg-info runs
