"""slurm/common.sh's shell-level hazards, checked without a cluster: its text, and its signal handlers run by bash with
stand-in scontrol/squeue commands.

bash 5.2 finds the end of a `$( )` by re-running its parser as it expands it, and runs a pending trap from inside
that parser, which then fails to parse the trap ("trap: line 2: unexpected EOF while looking for matching `)'"): a
TERM or USR1 that lands as the script expands a `$( )` loses its handler, and the shell goes on without it or hangs.
CI met it on 2026-12-07 (test_slurm_stop's scancel as the job started). The script's signal handlers are in place for
all its life, so it uses no `$( )` at all; the race itself is too narrow to hit on purpose in a test.

A trap runs between two commands of the main shell, so a handler that ran an `=~` replaced BASH_REMATCH between the
main shell's own `=~` and the line reading it (a step folder skipped, or `unbound variable` and an exit without a
word under set -u): the handlers must leave BASH_REMATCH as they found it.
"""

import os
import subprocess
from pathlib import Path

import pytest

from slurm_helpers import common_sh_functions

SLURM = Path(__file__).resolve().parent.parent / "slurm"


def command_substitutions(text: str) -> list[int]:
    """The line numbers of the shell text where a `$( )` command substitution starts: outside single quotes and
    comments (a `#` that starts a word, outside quotes), not arithmetic `$(( ))`."""
    found, quote, line, i = [], None, 1, 0
    while i < len(text):
        char = text[i]
        line += char == "\n"
        if quote == "'":
            quote = None if char == "'" else quote
        elif char == "\\":
            line += text[i + 1:i + 2] == "\n"
            i += 1  # the escaped character
        elif char == "#" and quote is None and (i == 0 or text[i - 1] in " \t\n;|&("):
            i = text.find("\n", i) - 1 if "\n" in text[i:] else len(text)
        elif char in "'\"" and quote is None:
            quote = char
        elif char == '"' and quote == '"':
            quote = None
        elif text.startswith("$(", i) and not text.startswith("$((", i):
            found.append(line)
        i += 1
    return found


def test_the_check_finds_what_it_looks_for():
    text = ('a=$(date)\nb=$((1 + 2))\n# c=$(date)\nd=`date`  # $(date)\n  e="x $(f)"\nlog "run #$(date)"\n'
            "f='$(not)'\ng=\"it's $(yes)\"; h=${x##*$(y)}\npython -c 'a\n$(b)' \\\n  $(c)\n")
    assert command_substitutions(text) == [1, 5, 6, 8, 8, 11]


def test_common_sh_runs_no_command_substitution():
    text = (SLURM / "common.sh").read_text()
    found = [f"{n}: {text.splitlines()[n - 1].strip()}" for n in command_substitutions(text)]
    assert not found, "slurm/common.sh uses $( ) (a trap that lands during it is lost: use backquotes or a " \
                      "function that sets a variable):\n" + "\n".join(found)


@pytest.mark.parametrize("script", sorted(path.name for path in SLURM.glob("*.sh")))
def test_the_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(SLURM / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_signal_handlers_leave_bash_rematch_as_they_found_it(tmp_path):
    """on_usr1 and on_term run against a job record that makes them read everything they read (the time limit's
    USR1 with 5 minutes left and a lead of @0600; a TERM of the time limit while Slurm requeues the job), then the
    main shell's last match must still be there. Also checks that they read the record right."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 'JobId=7 JobName=x JobState=RUNNING Reason=TimeLimit "
                                      "Requeue=1 Restarts=1 BatchFlag=1'\n")
    (bin_dir / "squeue").write_text("#!/bin/sh\necho '7 5:00'\n")
    for stand_in in bin_dir.iterdir():
        stand_in.chmod(0o755)
    functions = common_sh_functions("read_job_record", "record_has", "requeued_by_slurm", "requeue_disabled",
                                    "forward_usr1", "slurm_seconds", "usr1_lead_s", "usr1_of_time_limit", "on_usr1",
                                    "on_term")
    script = f"""set -uo pipefail
log() {{ echo "log: $*"; }}
{functions}
PREEMPTED=0 USR1_OF_TIME_LIMIT=0 SRUN_PID= TERMINATED=0 REQUEUED_BY_SLURM=0 TIME_LIMIT=0 CKPT_DIR=ckpt NO_REQUEUE=no
[[ "step_000123/checkpoint.json" =~ ^step_0*([0-9]+)/ ]]
on_usr1
on_term
echo "rematch=${{BASH_REMATCH[*]}} time_limit_usr1=$USR1_OF_TIME_LIMIT time_limit=$TIME_LIMIT" \
     "requeued=$REQUEUED_BY_SLURM"
"""
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "0",
           "SBATCH_SIGNAL": "B:USR1@0600"}
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=60)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "rematch=step_000123/ 123 time_limit_usr1=1 time_limit=1 requeued=1" in out, out
    assert "the time limit's USR1 came 0 s into this allocation" in out and "lead (600 s)" in out, out
    assert "TERM: Slurm is requeueing the job" in out, out
