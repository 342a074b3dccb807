"""The README's "Your own text" block, run as written (in a scratch folder holding links to tools/ and examples/, on a
small folder of texts of three kinds): train a tokenizer, preprocess, copy the quickstart config, train with the
block's overrides under torchrun on 2 ranks, export to Hugging Face format. Only the run's length is shortened (30
steps instead of the copy's 200). The quickstart test covers `make quickstart`; nothing ran this block, the second
thing a newcomer types. ~25 s on 2 cores."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from helpers import ROOT, readme_bash_block

SHORT_RUN = ("train.train_steps=30 lr_schedule.warmup_steps=3 lr_schedule.decay_start_step=20 "
             "lr_schedule.decay_steps=10 checkpoint.interval=10")


def own_text_block() -> list[str]:
    return readme_bash_block("\nYour own text, on this machine")


def test_the_block_is_what_this_test_runs():
    commands = own_text_block()
    assert [c.split()[0:2] for c in commands] == [
        ["python", "tools/train_tokenizer.py"], ["python", "tools/preprocess.py"],
        ["cp", "examples/configs/quickstart.yaml"], ["torchrun", "--nproc_per_node=2"],
        ["python", "tools/convert_to_hf.py"]]


def test_own_text_block_runs_start_to_finish(tmp_path):
    for name in ("tools", "examples"):
        (tmp_path / name).symlink_to(ROOT / name)
    texts = tmp_path / "my_texts"
    texts.mkdir()
    words = "the model reads text that a tokenizer cut into tokens and learns which token comes next".split()
    lines = [" ".join(words[(i + j) % len(words)] for j in range(40)) for i in range(60)]
    (texts / "docs.jsonl").write_text("".join(json.dumps({"text": line, "id": i}) + "\n"
                                              for i, line in enumerate(lines)))
    (texts / "notes.txt").write_text("\n".join(lines[:20]))
    (texts / "readme.md").write_text("# Notes\n\n" + "\n\n".join(lines[20:40]))
    script = "\n".join(c + (" " + SHORT_RUN if c.startswith("torchrun ") else "") for c in own_text_block())
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    said = proc.stdout + proc.stderr
    assert proc.returncode == 0, said[-4000:]
    assert "done: 30 steps, loss " in proc.stdout, said[-3000:]
    first, last = map(float, re.search(r"done: 30 steps, loss ([\d.]+) -> ([\d.]+)", proc.stdout).groups())
    assert last < first - 1.0, (first, last)
    assert "validation.data is set" not in said  # the block turns validation off whole: no note to puzzle over
    hf = tmp_path / "my" / "hf"
    assert json.loads((hf / "config.json").read_text())["vocab_size"] == 8192
    assert (hf / "tokenizer.json").is_file() and (hf / "model.safetensors").is_file()
