"""`torchrun --nproc_per_node=N -m nanotronix.train --config CONFIG.yaml [dotted.key=value ...]`"""
from __future__ import annotations

import argparse
import contextlib
import faulthandler
import gc
import os
import signal
import sys
import time
import traceback

from nanotronix.checkpoint.preemption import torchrun_pid
from nanotronix.cli import ArgumentParser, os_error_line, user_path
from nanotronix.config import dump_config, load_config
from nanotronix.config_checks import check_parallel_shape
from nanotronix.console import say
from nanotronix.errors import EXIT_BAD_INPUT, UserError, fail, say_line
from nanotronix.train import EXIT_INTERRUPTED, EXIT_PREEMPTED, Interrupted
from nanotronix.distributed import PeerStopped, init_distributed, note_cause_said, pick_device, rank, shutdown_and_exit

# How much later than the rank that says an error the others exit: longer than torchrun's --monitor-interval (0.1 s
# by default) and a failing rank's teardown.
EXIT_LATE_S = 3.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m nanotronix.train",
        description="Train a SmolLM2-family model with tensor, pipeline and data parallelism. "
                    "Launch with torchrun; overrides like train.train_steps=20 parallel.tp=2 change any config field.")
    parser.add_argument("--config", type=user_path, required=True, help="YAML config file")
    parser.add_argument("--print-config", action="store_true",
                        help="print the config the run would use (defaults, preset and overrides applied, dataset "
                             "paths resolved) as YAML and exit, without torchrun")
    parser.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="config overrides")
    return parser.parse_args(argv)


@contextlib.contextmanager
def collector_paused():
    """For the trainer's imports (torch's compiler stack, DCP, sympy: objects that live as long as the process): the
    garbage collector paused, and what they made then kept out of its sight (`gc.freeze`). Collections while they
    were made freed nothing and took ~15% of a rank's start-up CPU (~0.5 of 3.3 s), and each full collection of the
    training loop would scan them all again (a pause that holds up the other ranks' collectives)."""
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def main(argv=None) -> None:
    # A crash in native code (a token store truncated or rewritten in place under its memory map: SIGBUS) then
    # prints each thread's Python stack, which names the format's reader (not the store's path: faulthandler shows no
    # values), instead of only "Bus error".
    faulthandler.enable()
    torchrun_pid()  # whose worker this is, noted before the start-up's minutes: a torchrun gone by then is noticed
    args = parse_args(argv)
    code, exit_late = 0, False  # exit_late: a rank that did not meet the error itself, or leaves rank 0 to say it
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            check_parallel_shape(cfg)  # the layout's checks that need no world size: what any launch would refuse
            try:
                print(dump_config(cfg), end="", flush=True)
            except OSError as e:  # stdout on a full disk: what was asked for is not written (a pipe gone: the same)
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second failure at exit
                raise UserError(f"cannot write the config to standard output: {os_error_line(e)}") from None
            shutdown_and_exit(0)
        device = pick_device(cfg.train.device)
        init_distributed(device, cfg.parallel.collective_timeout_minutes)
        with collector_paused():
            from nanotronix.parallel import ParallelContext
            from nanotronix.train.trainer import train

        ctx = ParallelContext.build(cfg)
        summary = train(cfg, ctx, device)
        if summary.get("preempted"):
            code = EXIT_PREEMPTED  # saved; the scheduler should requeue the job
        elif rank() == 0 and summary["first_loss"] is not None:
            resumed = f" (steps {summary['first_step']}-{summary['steps']} in this run)" \
                if summary["first_step"] > 1 else ""
            say(f"done: {summary['steps']} steps{resumed}, loss {summary['first_loss']:.4f} -> "
                f"{summary['last_loss']:.4f}")
        elif rank() == 0 and summary["first_step"] <= summary["steps"]:  # steps trained, every one of them skipped
            say(f"done: {summary['steps']} steps; steps {summary['first_step']}-{summary['steps']} were all skipped "
                "(train.skip_steps): no update was applied in this run")
    except FloatingPointError as e:
        # The run diverged: the same on every rank (the loss and gradient norm are global), so rank 0 says it.
        if rank() == 0:
            say_line(f"error: {e}")
        code, exit_late = 1, rank() != 0
    except PeerStopped as e:
        # Not this rank's fault: one line, so that the stopped rank's own error stands out among thousands (one in
        # all, rank 0's, where the ranks that did not fail agreed on it: every_rank; none, where the rank that
        # stopped it said its error for the ranks it stops: said_elsewhere).
        if (not e.every_rank or rank() == 0) and not e.said_elsewhere:
            say_line(f"error: rank {rank()}: {e}")
        code, exit_late = 1, True
    except (UserError, FileNotFoundError) as e:
        # Bad input, one line, no traceback wall. A bad config, or a collective step that failed as a whole
        # (every_rank), is the same on every rank: rank 0 says it. Other bad input may show on some ranks only (a
        # stage's own check, a path one node lacks): each says it, unless another rank known to meet the same one
        # says it (said_elsewhere: a bad batch, read alike by a model replica's TP x PP ranks).
        if (getattr(e, "every_rank", False) and rank() != 0) or getattr(e, "said_elsewhere", False):
            code, exit_late = EXIT_BAD_INPUT, True
        else:
            code = fail(f"rank {rank()}: {e}" if rank() != 0 else e)
            if getattr(e, "said_for_the_stopped", False):
                note_cause_said()  # before this rank's exit fails the others' collectives
    except (Interrupted, KeyboardInterrupt) as e:  # Ctrl-C reaches every rank: rank 0 says it
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # and torchrun passes it on again
        if rank() == 0:
            print(e if isinstance(e, Interrupted) else "interrupted at start-up", file=sys.stderr, flush=True)
        code = EXIT_INTERRUPTED
    except Exception:
        traceback.print_exc()
        code = 1
    if exit_late:  # torchrun stops the other workers at the first exit it sees, and names that one the root cause
        time.sleep(EXIT_LATE_S)
    shutdown_and_exit(code)
