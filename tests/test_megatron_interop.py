"""Megatron-Core's own indexed-dataset code (`megatron.core.datasets.indexed_dataset`: the writer its
preprocess_data.py uses and the reader its GPT datasets use) against ours, both ways: the files are byte-identical,
each side reads the other's, and a store made by tools/preprocess.py reads in Megatron as the tokenizer's documents.
(The spec-derived writer of test_data_stores.py checks the same bytes from the format text.) Megatron runs in a
process of its own: importing megatron.core sets environment variables and warning filters. ~7 s, most of it
importing megatron.core."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from nanotronix.data import PreprocessOptions, multimodal_note, open_store, preprocess
from nanotronix.data.megatron_store import MegatronWriter
from nanotronix.data.sharded_store import ConcatenatedStore
from helpers import CORPUS, train_tiny_tokenizer

# Writes theirs_<dtype> for each job and reads every prefix given, printing {prefix: [[tokens of item i], ...]}.
MEGATRON_SIDE = """
import json, sys, warnings
import numpy as np
warnings.simplefilter("ignore")
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
jobs = json.loads(sys.argv[1])
for prefix, dtype, docs in jobs["write"]:
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=getattr(np, dtype))
    for doc in docs:
        builder.add_document(np.array(doc), [len(doc)])  # what preprocess_data.py does with each document
    builder.finalize(prefix + ".idx")
for prefix, docs in jobs["write_multimodal"]:  # each document one sequence of mode 0 and one of mode 1
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16, multimodal=True)
    for doc in docs:
        builder.add_document(np.array(doc), [1, len(doc) - 1], modes=[0, 1])
    builder.finalize(prefix + ".idx")
read = {}
for prefix in jobs["read"]:
    data = IndexedDataset(prefix)
    read[prefix] = {"items": [data[i].tolist() for i in range(len(data))],
                    "document_indices": data.document_indices.tolist(),
                    "sequence_lengths": data.sequence_lengths.tolist()}
print(json.dumps(read))
"""


def test_megatron_core_and_nanotronix_write_the_same_files_and_read_each_others(tmp_path):
    from tokenizers import Tokenizer

    rng = np.random.default_rng(1)
    docs = {"uint16": [rng.integers(0, 49152, size=n).tolist() for n in (1, 5, 2049, 3, 700)],
            "int32": [rng.integers(0, 128256, size=n).tolist() for n in (4, 1, 1500)]}
    for dtype, dtype_docs in docs.items():
        ours = MegatronWriter(tmp_path / f"ours_{dtype}", getattr(np, dtype))
        for doc in dtype_docs:
            ours.add_document(np.array(doc))
        ours.finalize({"tokenizer": {"name": "none", "vocab_size": 128256, "eos_id": 0}})
    tokenizer = train_tiny_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in CORPUS))
    preprocess(PreprocessOptions([str(tmp_path / "in.jsonl")], str(tokenizer), str(tmp_path / "preprocessed"),
                                 progress=False))

    jobs = {"write": [[str(tmp_path / f"theirs_{dtype}"), dtype, dtype_docs] for dtype, dtype_docs in docs.items()],
            "write_multimodal": [[str(tmp_path / "theirs_multimodal"), docs["uint16"][1:3]]],
            "read": [str(tmp_path / name) for name in ("ours_uint16", "ours_int32", "preprocessed")]}
    proc = subprocess.run([sys.executable, "-c", MEGATRON_SIDE, json.dumps(jobs)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    read = json.loads(proc.stdout.strip().splitlines()[-1])

    for dtype, dtype_docs in docs.items():
        for suffix in (".bin", ".idx"):  # byte for byte, both ways
            assert (tmp_path / f"ours_{dtype}{suffix}").read_bytes() == \
                (tmp_path / f"theirs_{dtype}{suffix}").read_bytes(), (dtype, suffix)
        theirs = open_store(tmp_path / f"theirs_{dtype}")  # no sidecar: read from .bin/.idx alone
        assert theirs.dtype == np.dtype(dtype)
        assert [theirs.document(i).tolist() for i in range(theirs.num_documents)] == dtype_docs
        got = read[str(tmp_path / f"ours_{dtype}")]
        assert got["items"] == dtype_docs and got["document_indices"] == list(range(len(dtype_docs) + 1))

    # megatron-core's multimodal=True: a mode byte per sequence after the index, which we read past (every sequence
    # trains as text tokens) and say so in a note (the trainer prints it) and in inspect_store
    multimodal = open_store(tmp_path / "theirs_multimodal")
    assert multimodal.multimodal and not open_store(tmp_path / "theirs_uint16").multimodal
    assert [multimodal.document(i).tolist() for i in range(multimodal.num_documents)] == docs["uint16"][1:3]
    assert multimodal_note({"mm": multimodal, "text": open_store(tmp_path / "theirs_uint16")}) == (
        "token stores mm are multimodal Megatron stores (their .idx holds a mode per sequence): the modes are "
        "ignored and every sequence is trained on as text tokens")
    assert multimodal_note({"text": open_store(tmp_path / "theirs_uint16")}) is None
    assert multimodal.summary()["multimodal"] is True
    assert ConcatenatedStore("folder", [open_store(tmp_path / "theirs_uint16"), multimodal]).multimodal  # any part

    encode = Tokenizer.from_file(str(tokenizer))
    want = [encode.encode(text, add_special_tokens=False).ids + [0] for text in CORPUS]  # + <|endoftext|>
    got = read[str(tmp_path / "preprocessed")]
    assert got["items"] == want and got["sequence_lengths"] == [len(doc) for doc in want]
