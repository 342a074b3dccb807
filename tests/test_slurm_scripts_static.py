"""What slurm/common.sh must not contain, read from its text (no cluster needed).

bash 5.2 finds the end of a `$( )` by re-running its parser as it expands it, and runs a pending trap from inside
that parser, which then fails to parse the trap ("trap: line 2: unexpected EOF while looking for matching `)'"): a
TERM or USR1 that lands as the script expands a `$( )` loses its handler, and the shell goes on without it or hangs.
CI met it on 2026-12-07 (test_slurm_stop's scancel as the job started). The script's signal handlers are in place for
all its life, so it uses no `$( )` at all; the race itself is too narrow to hit on purpose in a test.
"""

import re
import subprocess
from pathlib import Path

import pytest

SLURM = Path(__file__).resolve().parent.parent / "slurm"
# `$(` that is not arithmetic `$((`, before any comment on its line (a `#` at the start or after a blank).
COMMAND_SUBSTITUTION = re.compile(r"^(?:(?!(?:^|\s)#).)*?\$\((?!\()")


def command_substitutions(text: str) -> list[str]:
    """The lines of the shell text that run a `$( )` command substitution, as 'LINE: text'."""
    return [f"{number}: {line.strip()}" for number, line in enumerate(text.splitlines(), 1)
            if COMMAND_SUBSTITUTION.search(line)]


def test_the_check_finds_what_it_looks_for():
    found = command_substitutions('a=$(date)\nb=$((1 + 2))\n# c=$(date)\nd=`date`  # $(date)\n  e="x $(f)"\n')
    assert [line.split(":")[0] for line in found] == ["1", "5"]


def test_common_sh_runs_no_command_substitution():
    found = command_substitutions((SLURM / "common.sh").read_text())
    assert not found, "slurm/common.sh uses $( ) (a trap that lands during it is lost: use backquotes or a " \
                      "function that sets a variable):\n" + "\n".join(found)


@pytest.mark.parametrize("script", sorted(path.name for path in SLURM.glob("*.sh")))
def test_the_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(SLURM / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
