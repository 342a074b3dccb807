#!/usr/bin/env bash
# The quickstart's data (run by examples/quickstart.sh, and by tools/gpu_checks.sh for its trainer check): a corpus,
# a tokenizer and two token stores under quickstart/, each made only when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=quickstart
# 1. A real corpus that exists on every machine with Python: the standard library's source (and the modules that
#    follow it, held out for the validation loss).
[ -f "$OUT/corpus.jsonl" ] && [ -f "$OUT/heldout.jsonl" ] || "$PY" examples/quickstart/build_corpus.py \
    --output "$OUT/corpus.jsonl" --heldout "$OUT/heldout.jsonl"
# 2. A small byte-level BPE trained on it (real runs use the SmolLM2 tokenizer instead).
[ -f "$OUT/tokenizer.json" ] || "$PY" tools/train_tokenizer.py --input "$OUT/corpus.jsonl" --output "$OUT/tokenizer.json"
# 3. Tokenize both into Megatron .bin/.idx token stores.
[ -f "$OUT/data/stdlib.idx" ] || "$PY" tools/preprocess.py --input "$OUT/corpus.jsonl" --tokenizer "$OUT/tokenizer.json" \
    --output-prefix "$OUT/data/stdlib" --workers 2
[ -f "$OUT/data/heldout.idx" ] || "$PY" tools/preprocess.py --input "$OUT/heldout.jsonl" \
    --tokenizer "$OUT/tokenizer.json" --output-prefix "$OUT/data/heldout" --workers 2
