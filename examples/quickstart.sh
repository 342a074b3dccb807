#!/usr/bin/env bash
# The whole job on an embedded default, start to finish on a CPU in a few minutes (run by `make quickstart`):
# corpus -> tokenizer -> token store -> training with torchrun -> first and last loss.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=quickstart
NPROC=${NPROC:-1}

# 1. A real corpus that exists on every machine with Python: the standard library's source.
[ -f "$OUT/corpus.jsonl" ] || "$PY" examples/quickstart/build_corpus.py --output "$OUT/corpus.jsonl"
# 2. A small byte-level BPE trained on it (real runs use the SmolLM2 tokenizer instead).
[ -f "$OUT/tokenizer.json" ] || "$PY" tools/train_tokenizer.py --input "$OUT/corpus.jsonl" --output "$OUT/tokenizer.json"
# 3. Tokenise into a Megatron .bin/.idx token store, then show its summary.
[ -f "$OUT/data/stdlib.idx" ] || "$PY" tools/preprocess.py --input "$OUT/corpus.jsonl" --tokenizer "$OUT/tokenizer.json" \
    --output-prefix "$OUT/data/stdlib" --workers 2
"$PY" tools/inspect_store.py "$OUT/data/stdlib"
# 4. Train from scratch (a fresh run each time).
rm -rf "$OUT/logs" "$OUT/checkpoints"
"$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m nanotronix.train \
    --config examples/configs/quickstart.yaml
# 5. Did it learn?
"$PY" - "$OUT/logs/metrics.jsonl" <<'PYEOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
first, last = rows[0], rows[-1]
print(f"quickstart: loss {first['loss']:.3f} at step {first['step']} -> {last['loss']:.3f} at step {last['step']}")
if not last["loss"] < first["loss"] - 1.0:
    sys.exit("quickstart: the loss did not fall by a clear margin")
PYEOF
