# Set-up is part of every target: a fresh machine needs only python3 (3.10+) and make.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# DeepSpeed's JIT-compiled ops live with the venv, so every launcher (srun, mpirun) finds them.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions

# torch 2.14.1 with its CUDA libraries takes about 6 GB; a full disk fails with a clear line, not
# an OSError half-way through pip.
NEED_GB := 7

$(STAMP): setup.py
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); \
	if [ "$$free" -lt $(NEED_GB) ]; then \
		echo "make: $(CURDIR) has $$free GB free; installing into $(VENV) needs $(NEED_GB) GB" >&2; exit 1; \
	fi
	python3 -m venv $(VENV)
	# torch/torchvision pinned to the builds this project is tested with (2.14.1 / 0.29.1).
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test]"
	$(PY) tools/prebuild_ops.py
	touch $(STAMP)

.PHONY: install demo test test-fast tiny-pretrained tiny-pretrained-positions browser
install: $(STAMP)

# The search page's tests drive a real headless Chromium (Debian's packages), installed when missing.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		if [ "$$(id -u)" != 0 ]; then \
			echo "make: the page tests need chromium and chromedriver: apt-get install chromium chromium-driver (as root)" >&2; \
			exit 1; \
		fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	fi

# The built-in demo: tiny ALBEF on a generated corpus, 2 CPU ranks under the deepspeed launcher.
demo: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH deepspeed --num_gpus 2 albef_ds/train.py --deepspeed ds_configs/zero2.json

test: $(STAMP) browser
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q tests

# Unit tests only (no ranks, launchers, cluster or training runs): a few minutes.
test-fast: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q -m "not slow" tests

# The tiny pretrained checkpoint the downstream tasks' tests start from (shipped as
# tests/data/tiny_pretrained.safetensors, online weights, fp32): the demo's pretraining on one
# rank without distillation (tests/test_learning.py's recipe), then its conversion.
tiny-pretrained: $(STAMP)
	rm -rf output/tiny_pretrained
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH deepspeed --num_gpus 1 albef_ds/train.py --deepspeed ds_configs/zero2.json \
		--output_dir output/tiny_pretrained model.alpha=0.0 train.save_every=1000000 train.log_every=500
	$(PY) tools/convert_checkpoint.py --input output/tiny_pretrained \
		--output tests/data/tiny_pretrained.safetensors --no-momentum

# The tiny checkpoint that also knows where things are (tests/data/tiny_pretrained_positions.safetensors,
# where VQA's proof of learning starts): the same pretraining with the ViT's position embeddings
# started from the sin-cos table, in batches of 32 for 3,000 steps (docs/retrieval.md). One thread,
# as the shipped file was made: more threads sum in another order and end elsewhere.
tiny-pretrained-positions: $(STAMP)
	rm -rf output/tiny_pretrained_positions
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH OMP_NUM_THREADS=1 deepspeed --num_gpus 1 albef_ds/train.py --deepspeed ds_configs/zero2.json \
		--output_dir output/tiny_pretrained_positions model.alpha=0.0 train.save_every=1000000 train.log_every=500 \
		model.vision.pos_embed_init=sincos train.batch_size=32 train.max_steps=3000 train.epochs=24
	$(PY) tools/convert_checkpoint.py --input output/tiny_pretrained_positions \
		--output tests/data/tiny_pretrained_positions.safetensors --no-momentum
