import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pytest_configure(config):
    """One intra-op thread for every run the suite makes: in the test's own process, and (through OMP_NUM_THREADS)
    in the ranks it spawns, the commands it starts and the Slurm jobs it submits, which inherit the environment.
    `make test` runs two busy workers on two cores: with a thread per core in each, the tiny models' steps were many
    times slower, their OpenMP threads waiting on cores that another worker or rank holds (the tiny model's linear,
    64 tokens from 64 to 128 features, forward and backward: 0.12 ms on one thread, 5 ms on two, the machine busy)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    if hasattr(config, "workerinput"):  # a pytest-xdist worker (`make test`): see pytest_xdist_make_scheduler
        os.nice(WORKER_NICENESS)
    import torch

    torch.set_num_threads(1)


def pytest_collection_finish(session):
    """What collection made (torch, transformers, hypothesis, every test module) is kept to the end: moved out of the
    collector's sight, so that its full collections, automatic or a test's `gc.collect()`, scan only what the tests
    make since (the suite's in-process collections took ~15% of its tests' own CPU time in a worker that holds all
    of it)."""
    gc.freeze()


@pytest.fixture(scope="session")
def smollm2_tokenizer_path() -> str:
    """Path of the real SmolLM2 tokenizer.json, from NANOTRONIX_SMOLLM2_TOKENIZER (set by .ci/run)."""
    path = os.environ.get("NANOTRONIX_SMOLLM2_TOKENIZER")
    if not path or not Path(path).is_file():
        pytest.skip("the real SmolLM2 tokenizer is not available: set NANOTRONIX_SMOLLM2_TOKENIZER to its "
                    "tokenizer.json (.ci/run sets it to ../shared/smollm2/tokenizer.json)")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> str:
    """Path of a tiny byte-level BPE tokenizer.json (<|endoftext|> = 0), trained in well under a second."""
    from helpers import train_tiny_tokenizer
    return str(train_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer") / "tokenizer.json"))


# tools/ scripts that several test files call in this process (helpers.load_tool), loaded once per test module
@pytest.fixture(scope="module")
def preprocess_tool():
    """tools/preprocess.py (test_preprocess*.py)."""
    from helpers import load_tool
    return load_tool("preprocess")


@pytest.fixture(scope="module")
def plot_tool():
    """tools/plot_run.py (test_plot_run.py, test_metrics_log_properties.py)."""
    from helpers import load_tool
    return load_tool("plot_run")


@pytest.fixture(scope="module")
def plan_memory():
    """tools/_plan_memory.py, tools/plan.py's per-GPU memory model (test_plan_memory*.py)."""
    from helpers import load_tool
    return load_tool("_plan_memory")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny real run (4 steps, checkpoints at 2, 3 (kept for good) and 4): (its config file, its folder, holding
    the store `arith`, `ckpt/` and `logs/`). Made once per test module that asks for it."""
    from checkpoint_helpers import train_in_process
    from helpers import tiny_config, write_learnable_store

    tmp = tmp_path_factory.mktemp("run")
    cfg = tiny_config(tmp, write_learnable_store(tmp / "arith"), train={"train_steps": 4},
                      checkpoint={"dir": str(tmp / "ckpt"), "interval": 2, "keep_steps": [3]})
    train_in_process(cfg)
    return cfg, tmp


@pytest.fixture(scope="module")
def commands_in_process():
    """For calling commands' `main(argv)` in this process (test_cli_properties.py and
    test_checkpoint_manifest_properties.py): the Hub offline (a missing tokenizer name is tried as a Hub id) and the
    trainer's exit (os._exit) raised as SystemExit; faulthandler, which the trainer's main enables on the stderr of the
    call (a capture file that is gone after it), back on the real stderr at the end."""
    import faulthandler

    import huggingface_hub.constants

    import nanotronix.train.main as train_main

    def exit_as_system_exit(code: int):
        raise SystemExit(code)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setattr(train_main, "shutdown_and_exit", exit_as_system_exit)
        yield
    if faulthandler.is_enabled():
        faulthandler.enable(file=sys.__stderr__)


@pytest.fixture(scope="module")
def slurm():
    """A handle on the local two-node Slurm cluster (.ci/slurm_cluster.sh starts it unless it runs), for the Slurm test
    files (slurm_helpers.py); it cancels the module's jobs that are still queued at the end."""
    from slurm_helpers import Slurm
    start = subprocess.run(["bash", str(ROOT / ".ci" / "slurm_cluster.sh"), "start"], capture_output=True,
                           text=True, timeout=300)
    assert start.returncode == 0, f"could not start the Slurm cluster: {start.stderr}"
    conf = subprocess.run(["bash", str(ROOT / ".ci" / "slurm_cluster.sh"), "conf"], capture_output=True,
                          text=True).stdout.strip()
    cluster = Slurm(conf)
    yield cluster
    cluster.cancel_all()


# The files whose tests run jobs on the one local two-node Slurm cluster: one scope, so that one worker runs them one
# after another. Two of them at once (a file per worker) fight over its two nodes: a test that releases a requeued job
# once both nodes are idle, or one that kills a worker of a two-node job, meets the other file's jobs.
SLURM_JOB_FILES = ("test_slurm_failures.py", "test_slurm.py", "test_slurm_preemption.py", "test_slurm_stop.py")


# `make test` runs the files on pytest-xdist workers, a file per worker at a time (--dist loadfile, without
# xdist's reordering by test count): these take minutes each (the Slurm jobs, the quickstart's 4-process run, the
# layout launches), so they start first and the short files fill in around them, instead of one of them running
# alone at the end. Serial runs (plain `pytest tests`) keep this order too.
SLOW_FILES_FIRST = (*SLURM_JOB_FILES, "test_quickstart.py", "test_parallel_layouts.py", "test_checkpoint_reshard.py")


SLURM_SCOPE = "the Slurm job files"
# The workers, and the ranks and commands they start, yield the CPU to the Slurm jobs (slurmd starts those; Slurm does
# not pass a submitter's niceness on), which wait for the workers' tests otherwise: with three workers on two cores at
# equal niceness the Slurm files took ~1050 s (~410 s alone), the run's last ~10 minutes.
WORKER_NICENESS = 5


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """--dist loadfile, with the Slurm job files as one scope (above), run by a worker of their own.

    That worker mostly waits: the jobs run under slurmd and its own process polls scontrol (the Slurm files alone kept
    the 2-core machine ~20% busy over their ~7 minutes). With two workers, the one running them left most of a core
    idle for those minutes (the suite took 1205 and 1227 s on 2026-12-07, each with a per-test CPU probe); so while
    two other workers are there to run the rest (`make test` starts three), it takes no other file and stops once
    the Slurm files are done (977 s with WORKER_NICENESS). With two workers it goes on to other files as before, or
    one worker would run them all."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SlurmFilesOnTheirOwn(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return SLURM_SCOPE if Path(scope).name in SLURM_JOB_FILES else scope

        def _reschedule(self, node) -> None:
            work = self.assigned_work.get(node, {})
            if SLURM_SCOPE in work and len(self.nodes) > 2 and not node.shutting_down:
                if self._pending_of(work) == 0:
                    node.shutdown()
                return
            super()._reschedule(node)

    return SlurmFilesOnTheirOwn(config, log)


def pytest_collection_modifyitems(config, items):
    first = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: first.get(item.path.name, len(first)))  # stable: the others keep their order
