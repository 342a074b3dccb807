#!/usr/bin/env python
"""Data-path benchmark on real text: preprocessing vs raw `tokenizers`, sampler reads vs raw memmap slicing.

    python tools/bench_data.py --tokenizer TOKENIZER [--corpus DIR ...] [--max-mb 8] [--workers N]

1. Preprocessing: the corpus (default: this Python's standard library sources, plus /usr/share prose when
   installed) is written as JSON lines, then tokenised twice with the same worker count: by the raw
   `Tokenizer.encode_batch` on texts already in memory (Rust thread pool of N threads), and by the whole
   `tools/preprocess.py` pipeline (read, parse, tokenise in N processes, write the store). Goal: >= 0.85.
2. Sampler: random windows of seq_len+1 tokens from the resulting store, read by the training loader
   (schedule lookup, permutation, read, int64 batch) vs `np.array(tokens[s:s+L+1])` on a plain memmap view
   at random offsets. Goal: >= 0.5. Both are measured in this run, on this machine.
"""
import argparse
import json
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

PROSE = ["/usr/share/games/fortunes", "/usr/share/doc/python3.11", "/usr/share/doc/jargon-text"]
SUFFIXES = (".py", ".txt", ".rst", ".md")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json, folder or Hub id")
    parser.add_argument("--corpus", nargs="+", help="folders of text/code (default: Python stdlib + prose)")
    parser.add_argument("--max-mb", type=float, default=8.0, help="corpus size cap in MB (default 8)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="workers/threads (default: cores)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--reads", type=int, default=8192, help="random windows read per sampler measurement")
    return parser.parse_args(argv)


def collect_texts(folders, max_bytes):
    texts, total = [], 0
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")):
            if total >= max_bytes:
                return texts
            if path.is_file() and (path.suffix in SUFFIXES or folder in PROSE and not path.suffix):
                try:
                    text = path.read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError):
                    continue
                if text.strip():
                    texts.append(text)
                    total += len(text.encode())
    return texts


def bench_preprocess(args, texts, workdir):
    from tokenizers import Tokenizer
    from nanotronix.data import PreprocessOptions, load_tokenizer, preprocess
    _, info = load_tokenizer(args.tokenizer)
    corpus = workdir / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok = Tokenizer.from_file(info.file)
    tok.encode_batch(texts[:50])  # warm-up (thread pool start)
    start = time.perf_counter()
    encodings = tok.encode_batch(texts, add_special_tokens=False)
    raw_seconds = time.perf_counter() - start
    raw_tokens = sum(len(e.ids) for e in encodings)
    del encodings
    start = time.perf_counter()
    result = preprocess(PreprocessOptions([str(corpus)], args.tokenizer, str(workdir / "store"),
                                          workers=args.workers, progress=False))
    ours_seconds = time.perf_counter() - start
    ours_tokens = result.tokens - result.documents  # without the EOS ids the raw encoder does not produce
    if ours_tokens != raw_tokens:
        raise SystemExit(f"bench_data: token counts differ (pipeline {ours_tokens}, raw {raw_tokens})")
    return raw_tokens / raw_seconds, ours_tokens / ours_seconds, raw_tokens, str(workdir / "store")


def bench_sampler(args, store_prefix):
    import numpy as np
    from nanotronix.config import config_from_dict
    from nanotronix.data import build_train_loader, open_store
    store = open_store(store_prefix)
    seq = min(args.seq_len, store.num_tokens // 4)
    rng = np.random.default_rng(0)

    def loader(dp, mbs, gbs):
        cfg = config_from_dict({
            "model": {"preset": "smollm2-135m", "num_hidden_layers": 1, "max_position_embeddings": max(seq, 2048)},
            "train": {"seq_len": seq, "global_batch_size": gbs, "micro_batch_size": mbs},
            "data": {"stages": [{"name": "bench", "start_step": 1, "datasets": [{"path": store_prefix}]}]}})
        return build_train_loader(cfg, 0, dp)

    def rate(read_batch, per_call):
        calls = max(1, args.reads // per_call)
        read_batch()
        start = time.perf_counter()
        for _ in range(calls):
            read_batch()
        return calls * per_call / (time.perf_counter() - start)

    view = np.memmap(f"{store_prefix}.bin", dtype=store.dtype, mode="r").view(np.ndarray)
    starts = rng.integers(0, store.num_tokens - seq - 1, size=args.reads).tolist()

    def raw_batch(it=iter(range(1 << 62))):
        k = next(it) % (len(starts) - 1024)
        return [np.array(view[s:s + seq + 1]) for s in starts[k:k + 1024]]

    raw = rate(raw_batch, 1024)
    full = loader(1, 4, 1024)  # a whole SmolLM2 global batch (1024 windows) per call
    steps = rng.integers(1, 1 << 30, size=1 << 16).tolist()
    sampler_full = rate(lambda it=iter(steps): full.batch(next(it)), 1024)
    rank = loader(256, 4, 1024)  # one of 256 DP ranks: 4 windows per call
    raw_small = rate(lambda it=iter(range(1 << 62)): [np.array(view[s:s + seq + 1]) for s in
                                                       starts[(next(it) * 4) % (len(starts) - 4):][:4]], 4)
    sampler_rank = rate(lambda it=iter(steps): rank.batch(next(it)), 4)
    return seq, raw, sampler_full, raw_small, sampler_rank


def main(argv=None):
    args = parse_args(argv)
    # The raw baseline runs `encode_batch` on the Rust thread pool; give it exactly N threads (read once,
    # before the pool starts). The pipeline's own workers disable that pool and use N processes instead.
    os.environ["RAYON_NUM_THREADS"] = str(args.workers)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    folders = args.corpus or [sysconfig.get_paths()["stdlib"]] + [p for p in PROSE if Path(p).is_dir()]
    texts = collect_texts(folders, int(args.max_mb * 1e6))
    if not texts:
        print("bench_data: error: no text found in " + ", ".join(folders), file=sys.stderr)
        return 2
    mb = sum(len(t.encode()) for t in texts) / 1e6
    from nanotronix.data import DataError
    try:
        with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
            raw_tps, ours_tps, tokens, store = bench_preprocess(args, texts, Path(tmp))
            seq, raw, full, raw_small, rank = bench_sampler(args, store)
    except DataError as e:
        print(f"bench_data: error: {e}", file=sys.stderr)
        return 2
    print(f"corpus: {len(texts)} documents, {mb:.1f} MB, {tokens:,} tokens ({', '.join(folders)}); "
          f"workers: {args.workers}; cores: {os.cpu_count()}")
    print(f"{'measurement':58s} {'ours':>14s} {'baseline':>14s} {'ratio':>6s} goal")
    rows = [
        ("preprocess tokens/s (vs raw encode_batch, same workers)", ours_tps, raw_tps, 0.85),
        (f"sampler windows/s, {seq + 1} tokens, 1024 per call", full, raw, 0.5),
        (f"sampler windows/s, {seq + 1} tokens, 4 per call (1 of 256 ranks)", rank, raw_small, 0.5),
    ]
    for name, ours, base, goal in rows:
        print(f"{name:58s} {ours:14,.0f} {base:14,.0f} {ours / base:6.2f} >= {goal}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
