"""torchrun worker for tests/test_plan_memory_compiled.py: the bytes a decoder layer saves for backward per token,
eager and compiled, in one of its tensor-parallel layouts (sequence parallel; as many ranks as its tp).

    torchrun --nproc_per_node=TP tests/dist_plan_memory_compiled.py OUT.json LAYOUT
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist_common import run_worker  # noqa: E402
from test_plan_memory_compiled import LAYOUTS, per_layer_bytes  # noqa: E402


def main() -> None:
    dist.init_process_group("gloo")

    def measure() -> None:
        measured = per_layer_bytes(*LAYOUTS[sys.argv[2]])
        if dist.get_rank() == 0:
            Path(sys.argv[1]).write_text(json.dumps(measured))
    run_worker(measure)


if __name__ == "__main__":
    main()
