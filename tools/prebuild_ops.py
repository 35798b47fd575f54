"""Compiles DeepSpeed's JIT ops for this machine once, at install time, instead of inside the first
training run (or, worse, in every rank of the first test at once).

On GPU: FusedAdam and CPU Adam (offload). On CPU: the shared-memory collectives, FusedAdam (the
CPU build) and CPU Adam. The build cache is TORCH_EXTENSIONS_DIR (the Makefile sets it).
"""
import torch
from deepspeed.accelerator import get_accelerator

BUILDERS = ["FusedAdamBuilder", "CPUAdamBuilder"] + ([] if torch.cuda.is_available() else ["ShareMemCommBuilder"])

for name in BUILDERS:
    builder = get_accelerator().create_op_builder(name)
    if builder is None or not builder.is_compatible():
        print(f"{name}: not available on this machine, skipped")
        continue
    builder.load()
    print(f"{name}: ready")
