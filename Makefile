# Set-up is part of every target: a fresh machine needs only python3 (3.10+) and make.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The environment's own tools (deepspeed, mpirun, ninja) first, for every recipe.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# DeepSpeed's JIT-compiled ops live with the venv, so every launcher (srun, mpirun) finds them.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions

# The torch / torchvision builds this project is tested with: the one place they are pinned
# (setup.py states the range it runs on).
TORCH := torch==2.14.1 torchvision==0.29.1
# torch 2.14.1 with its CUDA libraries takes about 6 GB; a full disk fails with a clear line, not
# an OSError half-way through pip.
NEED_GB := 7

$(STAMP): setup.py
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); \
	if [ "$$free" -lt $(NEED_GB) ]; then \
		echo "make: $(CURDIR) has $$free GB free; installing into $(VENV) needs $(NEED_GB) GB" >&2; exit 1; \
	fi
	@# libjpeg-turbo's headers, for the JPEG region decoder (albef_ds/data/_jpeg.c), installed when
	@# missing (as root, Debian); without them pip builds everything else and says why
	@if [ ! -f /usr/include/jpeglib.h ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libjpeg62-turbo-dev; \
	fi
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
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
	deepspeed --num_gpus 2 albef_ds/demo.py --deepspeed ds_configs/zero2.json

# Two test files at a time (pytest-xdist, a file's tests together on one worker, so a file's fixed
# ports and the one local Slurm cluster are never shared): a test's processes leave the second
# core idle much of the time (start-up imports, rendezvous, evaluations, waits on Slurm), and no
# number moves with the machine's load (every run's thread count is fixed). Idle OpenMP threads
# sleep (OMP_WAIT_POLICY=PASSIVE) instead of spinning against the other file's processes.
test: $(STAMP) browser
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q -n 2 --dist loadfile --durations=25 tests

# Unit tests only (tests/unit: no ranks, launchers, cluster or training runs): 279 tests in 49 s
# (about 55 s with pytest's start-up) on the quiet 2-core dev machine, 2026-12-06.
test-fast: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q -n 2 --dist loadfile tests/unit

# The tiny pretrained checkpoints the downstream tasks' tests start from (online weights, fp32):
# the demo's pretraining on one rank without distillation, then its conversion.
#   tests/data/tiny_pretrained.safetensors: tests/learning/test_learning.py's recipe.
#   tests/data/tiny_pretrained_positions.safetensors: the ViT's position embeddings started from the
#   sin-cos table, in batches of 32 for 3,000 steps, so it also knows where things are
#   (docs/retrieval.md); on one thread, as the shipped file was made: more threads sum in another
#   order and end elsewhere.
TINY_RECIPE := model.alpha=0.0 train.save_every=1000000 train.log_every=500
tiny-pretrained: TINY_OVERRIDES :=
tiny-pretrained-positions: TINY_THREADS := OMP_NUM_THREADS=1
tiny-pretrained-positions: TINY_OVERRIDES := model.vision.pos_embed_init=sincos train.batch_size=32 \
	train.max_steps=3000 train.epochs=24
tiny-pretrained tiny-pretrained-positions: $(STAMP)
	rm -rf output/$(subst -,_,$@)
	$(TINY_THREADS) deepspeed --num_gpus 1 albef_ds/demo.py --deepspeed ds_configs/zero2.json --config tiny \
		--output_dir output/$(subst -,_,$@) $(TINY_RECIPE) $(TINY_OVERRIDES)
	$(PY) tools/convert_checkpoint.py --input output/$(subst -,_,$@) \
		--output tests/data/$(subst -,_,$@).safetensors --no-momentum
