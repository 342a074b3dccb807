"""Property-based tests (hypothesis) of the tensor-parallel layers and the vocab-parallel losses over real gloo
process groups of 2, 3 and 4 ranks, each against the dense single-process op in fp64 (F.linear, F.embedding,
F.cross_entropy of the whole logits); the fixed-shape examples are in test_parallel_layers.py:

- vocab_parallel_cross_entropy (every reduction) of logits spread 0.1-100, fp32 or bf16, over vocabularies of 1-64
  ids per rank, labels often at the ranks' slice edges, none / some / all but one / all at the ignore index -100:
  the loss (nan for the mean over none) and d/d logits under any incoming gradient;
- head_and_loss (the head fused into the vocab-parallel loss, chunks dividing the tokens or not, past them or of
  one token; head input copied or gathered over the sequence; fp32, the trainer's bf16 compute dtype, bf16
  autocast): the mean loss and d/d hidden, d/d the head weight, held to test_numerics_properties' tolerances for
  the plain fused loss;
- ColumnParallelLinear (input copy, gather_sequence) and RowParallelLinear (reduce,
  reduce_scatter_sequence), fp32 and bf16 autocast: output and both gradients; VocabParallelEmbedding (plain and
  sequence parallel): output exactly and the weight's gradient;
- the sequence collectives: gather and scatter undo each other, every backward is the adjoint collective, an
  indivisible sequence is refused.

One torchrun per tp size (one per hypothesis example would cost ~5 s each): hypothesis draws the cases here
(derandomized: the same cases every run), tests/dist_parallel_properties.py checks them all and reports each
quantity's error and scales, and each test below holds its kind's cases to the tolerances stated in TOLERANCES. A
failure names each failing case (its JSON: shapes, seed, modes) and the file of them to replay with torchrun; no
shrinking, so the failing cases are listed smallest first. 150 cases, ~30 s on 2 cores (the three torchrun
launches, not the cases, take most of it)."""
from __future__ import annotations

import functools
import itertools
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import torchrun
from properties import PROPERTY, log_uniform

WORKER = str(Path(__file__).resolve().parent / "dist_parallel_properties.py")
TP_SIZES = (2, 3, 4)
BF16_EPS = 2.0 ** -8  # the spacing of bf16 numbers in [1, 2): its relative rounding is half of it

# (rel, floor_rel): a quantity passes when error <= rel * scale + floor_rel * floor (the worker's docstring says
# what scale and floor are). As test_numerics_properties.py holds the single-process numerics:
TOLERANCES = {
    "exact": (0.0, 0.0),  # moved, not computed: gathers, scatters, an embedding's row plus zeros
    "fp32": (1e-5, 1e-6),  # fp32 rounding of the result, and of the terms that cancel in it
    "bf16": (8 * BF16_EPS, 8 * BF16_EPS),  # bf16 matmuls: inputs and result rounded to 8 bits
    "bf16_loss": (0.0, 4 * BF16_EPS),  # a few bf16 roundings of a logit of spread max |w_v|
    "bf16_logits_grad": (2 * BF16_EPS, 2 * BF16_EPS),  # softmax - onehot made in fp32, rounded to bf16 once
}

SEEDS = st.integers(0, 2 ** 31 - 1)
IGNORED = ["none", "some", "all_but_one", "all"]

# What hypothesis draws for a case never depends on its tp size or modes (hypothesis wants each example's draws
# to depend on its choices alone); `place` then fits the drawn sizes to them: a count per rank times tp, and a
# sequence length rounded up to a multiple of tp where the sequence is split over the ranks.


def per_rank(most: int) -> st.SearchStrategy[int]:
    """A count per rank (of vocabulary ids or features): `place` multiplies it by tp."""
    return st.integers(1, most)


@st.composite
def cross_entropy_draws(draw) -> dict:
    return {"rows": draw(st.integers(1, 3)), "tokens": draw(st.integers(1, 64)), "vocab": draw(per_rank(64)),
            "logit_scale": draw(log_uniform(0.1, 100.0)), "boundary": draw(st.booleans()),
            "grad_loss": draw(log_uniform(0.1, 10.0)), "seed": draw(SEEDS)}


@st.composite
def head_and_loss_draws(draw) -> dict:
    """`chunk` from 1 to past the tokens, or (`chunk_divides`) the one of the tokens' divisors it picks."""
    return {"rows": draw(st.integers(1, 3)), "tokens": draw(st.integers(1, 48)), "chunk": draw(st.integers(1, 200)),
            "chunk_divides": draw(st.booleans()), "hidden": draw(st.integers(1, 32)), "vocab": draw(per_rank(48)),
            "logit_scale": draw(log_uniform(0.1, 100.0)), "ignored": draw(st.sampled_from(IGNORED)),
            "boundary": draw(st.booleans()), "grad_loss": draw(log_uniform(0.1, 10.0)), "seed": draw(SEEDS)}


@st.composite
def linear_draws(draw) -> dict:
    """d_in and d_out: a count per rank on the side column/row parallelism splits, the whole size on the other."""
    return {"rows": draw(st.integers(1, 3)), "tokens": draw(st.integers(1, 24)), "d_in": draw(st.integers(1, 32)),
            "d_out": draw(st.integers(1, 32)), "input_scale": draw(log_uniform(0.01, 100.0)), "seed": draw(SEEDS)}


@st.composite
def embedding_draws(draw) -> dict:
    return {"rows": draw(st.integers(1, 3)), "tokens": draw(st.integers(1, 24)), "vocab": draw(per_rank(32)),
            "hidden": draw(st.integers(1, 16)), "boundary": draw(st.booleans()), "seed": draw(SEEDS)}


@st.composite
def sequence_draws(draw) -> dict:
    return {"rows": draw(st.integers(1, 3)), "tokens": draw(st.integers(1, 32)), "hidden": draw(st.integers(1, 8)),
            "seed": draw(SEEDS)}


def place(kind: str, drawn: dict, tp: int, stratum: dict) -> dict:
    """The case of `kind` at `tp` ranks in `stratum` (its modes) from what hypothesis drew."""
    case = {"kind": kind, "tp": tp, **stratum, **drawn}
    sequence_split = (kind == "sequence" or stratum.get("sequence_parallel")
                      or stratum.get("mode") in ("gather_sequence", "reduce_scatter_sequence"))
    if sequence_split:
        case["tokens"] = -(-case["tokens"] // tp) * tp
    if "vocab" in case:
        case["vocab"] *= tp
    if kind == "column":
        case["d_out"] *= tp
    if kind == "row":
        case["d_in"] *= tp
    if kind == "head_and_loss":
        n = case["rows"] * case["tokens"]
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        pick = case.pop("chunk") - 1
        case["chunk"] = divisors[pick % len(divisors)] if case.pop("chunk_divides") else 1 + pick % (n + 20)
    return case


def product(**choices: list) -> list[dict]:
    return [dict(zip(choices, values)) for values in itertools.product(*choices.values())]


# kind: (what hypothesis draws for it, its strata: every combination of its modes, each drawn at every tp size)
KINDS = {
    "cross_entropy": (cross_entropy_draws(), product(reduction=["mean", "sum", "none"], ignored=IGNORED,
                                                     precision=["fp32", "bf16"])),
    "head_and_loss": (head_and_loss_draws(), product(mode=["copy", "gather_sequence"],
                                                     precision=["fp32", "bf16", "bf16_autocast"])),
    "column": (linear_draws(), product(mode=["copy", "gather_sequence"], precision=["fp32", "bf16_autocast"])),
    "row": (linear_draws(), product(mode=["reduce", "reduce_scatter_sequence"], precision=["fp32", "bf16_autocast"])),
    "embedding": (embedding_draws(), product(sequence_parallel=[False, True])),
    "sequence": (sequence_draws(), [{}]),
}
ROUNDS = {"head_and_loss": 2, "sequence": 2}  # how many times each stratum is drawn at each tp size (default 1)


@functools.cache
def drawn_cases() -> list[dict]:
    """Every kind's cases, each stratum ROUNDS times at each tp size: hypothesis' examples in turn fill the
    (stratum, tp) slots (it only collects them here: one torchrun per tp size checks them all)."""
    cases = []
    for kind, (strategy, strata) in KINDS.items():
        slots = [(stratum, tp) for stratum in strata for tp in TP_SIZES]
        count = len(slots) * ROUNDS.get(kind, 1)
        drawn = []

        @settings(PROPERTY, max_examples=count)
        @given(example=strategy)
        def collect(example):
            stratum, tp = slots[len(drawn) % len(slots)]
            drawn.append(place(kind, example, tp, stratum))

        collect()
        assert len(drawn) == count, f"hypothesis drew {len(drawn)} {kind} cases, not {count}"
        cases += drawn
    return cases


@pytest.fixture(scope="module", params=TP_SIZES, ids=lambda tp: f"tp{tp}")
def checked(request, tmp_path_factory):
    """(tp, folder, cases, the worker's measurements of each)."""
    tp = request.param
    folder = tmp_path_factory.mktemp(f"parallel_properties_tp{tp}")
    cases = [case for case in drawn_cases() if case["tp"] == tp]
    (folder / "cases.json").write_text(json.dumps(cases))
    proc = torchrun(tp, [WORKER, str(folder / "cases.json"), str(folder / "results.json")], timeout=300)
    raised = [line for line in proc.stderr.splitlines() if "this case raised" in line]
    assert proc.returncode == 0, "\n".join(raised) + "\n" + proc.stdout[-2000:] + proc.stderr[-4000:]
    return tp, folder, cases, json.loads((folder / "results.json").read_text())


def violations(measured: dict) -> list[str]:
    found = []
    for quantity, value in measured.items():
        if not isinstance(value, list):
            continue
        error, scale, floor, tolerance = value
        rel, floor_rel = TOLERANCES[tolerance]
        bound = rel * scale + floor_rel * floor
        if not error <= bound:
            found.append(f"{quantity}: error {error:.3g} > {bound:.3g} ({tolerance})")
    return found


def size(case: dict) -> int:
    """How big a case is: its tokens times the larger of its vocabulary and its features."""
    width = max(case.get(key, 1) for key in ("vocab", "hidden", "d_in", "d_out"))
    return case["rows"] * case["tokens"] * width


@pytest.mark.parametrize("kind", list(KINDS))
def test_tensor_parallel_equals_dense_fp64(checked, kind):
    tp, folder, cases, results = checked
    mine = [(case, measured) for case, measured in zip(cases, results) if case["kind"] == kind]
    assert mine, kind
    failed = sorted(((case, found) for case, measured in mine if (found := violations(measured))),
                    key=lambda failure: size(failure[0]))
    if failed:
        replay = folder / f"failed_{kind}.json"
        replay.write_text(json.dumps([case for case, _ in failed]))
        lines = [f"{json.dumps(case)}\n    " + "; ".join(found) for case, found in failed]
        pytest.fail(f"{len(failed)} of {len(mine)} {kind} cases at tp={tp} differ from dense:\n" + "\n".join(lines)
                    + f"\nreplay: torchrun --nproc_per_node={tp} {WORKER} {replay} OUT.json", pytrace=False)
