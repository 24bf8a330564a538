#!/usr/bin/env python
"""Convert checkpoints between HuggingFace and Megatron-Core; same as `atropos-megatron convert`.

    python tools/convert_checkpoint.py hf-to-mcore --hf HF_DIR --out MCORE_DIR [--tp N --pp M] [--verify]
    python tools/convert_checkpoint.py mcore-to-hf --mcore MCORE_DIR --out HF_DIR [--verify]

Run with --help for every option. The logic lives in atropos_megatron/weights/convert.py.
"""

import sys

from atropos_megatron.weights.convert import main

if __name__ == "__main__":  # the checkpoint writer spawns processes that re-import this file
    sys.exit(main(prog="tools/convert_checkpoint.py"))
