"""The c10d rendezvous store of a multi-node torchrun job, hosted by the job itself rather than by one of the
torchrun agents.

    python -m nanotronix.rendezvous_store --port PORT      # runs until SIGTERM / SIGINT / SIGHUP

slurm/common.sh starts it on the first node (where the batch script runs) before it launches an agent on every
node, each told it is not the host (`--rdzv_conf=is_host=0`). Left to torchrun, the store lives inside the agent
whose machine matches the endpoint's name: when that node's processes fail, its agent exits and takes the store
with it, and every other agent then logs TCPStore errors and C++ stack dumps while it stops, burying the one line
that says what went wrong; and where no agent recognises the endpoint as its own machine (nodes that know each
other by another name), none hosts it and the rendezvous times out. torch's TCPStore server is what is hosted
here; this module only keeps it alive for the job and is quiet.

Started with SIGTERM ignored (slurm/common.sh), it keeps ignoring it: Slurm's TERM of a scancel or a time limit
reaches every process of the job, the store too, while the agents still report to it as they wait for their workers
to save and stop. SIGHUP (or SIGINT) ends it then.
"""
from __future__ import annotations

import contextlib
import datetime
import signal
import sys

from nanotronix.cli import ArgumentParser, integer, one_line_errors
from nanotronix.errors import fail


@one_line_errors
def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m nanotronix.rendezvous_store",
                                     description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--port", type=integer, required=True, help="TCP port to listen on (all interfaces)")
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535:
        parser.error(f"--port {args.port}: not a TCP port (1-65535)")
    # The batch shell's USR1 (save and requeue) may reach its children (`scancel --signal=USR1 --batch`): the store
    # must outlive it, since the trainers save a checkpoint, which needs no rendezvous, but their agents still
    # report to it until they exit.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if signal.getsignal(signal.SIGTERM) != signal.SIG_IGN:  # an ignored SIGTERM: the module docstring says why
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # SIGHUP always ends it: it is how slurm/common.sh stops it, and a launcher may hand it down ignored (nohup, a
    # CI runner), which left the store running after the job's shell had gone.
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(0))
    from torch.distributed import TCPStore
    try:
        store = TCPStore("0.0.0.0", args.port, is_master=True, wait_for_workers=False, multi_tenant=True,
                         timeout=datetime.timedelta(hours=1))
    except (RuntimeError, ValueError) as e:  # torch's DistNetworkError (a RuntimeError): the port is taken
        return fail(f"rendezvous store: cannot listen on port {args.port}: {str(e).splitlines()[0]}")
    with contextlib.suppress(KeyboardInterrupt):  # SIGINT, as SIGTERM, ends it quietly
        while True:
            signal.pause()
    del store
    return 0


if __name__ == "__main__":
    sys.exit(main())
