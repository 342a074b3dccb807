"""torchrun worker for tests/test_plan_memory_compiled.py: the bytes a decoder layer saves for backward per token,
eager and compiled, at tp 2 with sequence parallelism.

    torchrun --nproc_per_node=2 tests/dist_plan_memory_compiled.py OUT.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist_common import run_worker  # noqa: E402
from test_plan_memory_compiled import TP2_SP, per_layer_bytes  # noqa: E402


def main() -> None:
    dist.init_process_group("gloo")

    def measure() -> None:
        measured = per_layer_bytes(TP2_SP)
        if dist.get_rank() == 0:
            Path(sys.argv[1]).write_text(json.dumps(measured))
    run_worker(measure)


if __name__ == "__main__":
    main()
