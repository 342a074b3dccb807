"""`python -m nanotronix.evaluate` against the same loss computed by transformers on the exported model, with the
windows read straight from the Megatron .bin (raw concatenated tokens, per the format spec), with and without document
masking. Costs ~15 s."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch
import transformers

from checkpoint_helpers import TINY, adamw, plain_model, save_single, train_steps
from helpers import ROOT, write_learnable_store

from nanotronix.checkpoint.hf_export import export_to_hf
from nanotronix.data.megatron_store import MegatronWriter

SEQ, WINDOWS = 32, 11  # 11 windows with batch size 4: the last batch is partial


def evaluate_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanotronix.evaluate", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=180)


def test_evaluate_matches_transformers_on_the_export(tmp_path):
    store = write_learnable_store(tmp_path / "store" / "arith", num_docs=30, vocab=TINY.vocab_size)
    model = plain_model()
    opt = adamw(model)
    train_steps(model, opt, range(1, 4))
    save_single(tmp_path / "run", 3, model, opt)

    proc = evaluate_cli("--checkpoint", str(tmp_path / "run"), "--data", str(store), "--seq-len", str(SEQ),
                        "--num-samples", str(WINDOWS), "--batch-size", "4", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["step"] == 3 and result["tokens"] == SEQ * WINDOWS

    stream = np.fromfile(f"{store}.bin", dtype=np.uint16).astype(np.int64)
    windows = torch.from_numpy(np.stack([stream[i * SEQ:i * SEQ + SEQ + 1] for i in range(WINDOWS)]))
    hf_dir = export_to_hf(tmp_path / "run", tmp_path / "hf", progress=False, log=lambda _: None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").float().eval()
    with torch.no_grad():
        reference = hf(input_ids=windows, labels=windows).loss.item()  # transformers shifts the labels itself
    assert abs(result["loss"] - reference) < 1e-5, (result["loss"], reference)


def test_a_document_masked_checkpoint_matches_transformers_on_each_document(tmp_path):
    """A checkpoint trained with model.document_mask_eos_id is scored with the mask: each window's loss is
    transformers' on every document of its inputs run alone (an EOS ends its document; positions restart), with the
    targets read straight from the .bin; attention across the documents gives another loss."""
    import dataclasses
    eos = 0  # write_learnable_store's EOS id
    store = write_learnable_store(tmp_path / "store" / "arith", num_docs=30, vocab=TINY.vocab_size)
    model = plain_model(dataclasses.replace(TINY, document_mask_eos_id=eos))
    opt = adamw(model)
    train_steps(model, opt, range(1, 4), model.config)
    save_single(tmp_path / "run", 3, model, opt)
    proc = evaluate_cli("--checkpoint", str(tmp_path / "run"), "--data", str(store), "--seq-len", str(SEQ),
                        "--num-samples", str(WINDOWS), "--batch-size", "4", "--json", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    loss = json.loads(proc.stdout)["loss"]

    stream = torch.from_numpy(np.fromfile(f"{store}.bin", dtype=np.uint16).astype(np.int64))
    hf_dir = export_to_hf(tmp_path / "run", tmp_path / "hf", progress=False, log=lambda _: None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").float().eval()
    total, across, several = 0.0, 0.0, 0
    with torch.no_grad():
        for i in range(WINDOWS):
            window = stream[i * SEQ:i * SEQ + SEQ + 1]
            inputs, targets = window[:-1], window[1:]
            ends = [j + 1 for j in range(SEQ) if inputs[j] == eos and j + 1 < SEQ] + [SEQ]
            starts = [0] + ends[:-1]
            several += len(starts) > 1
            logits = torch.cat([hf(input_ids=inputs[a:b][None]).logits[0] for a, b in zip(starts, ends)])
            total += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
            whole = hf(input_ids=inputs[None]).logits[0]
            across += torch.nn.functional.cross_entropy(whole, targets, reduction="sum").item()
    assert several > 0  # windows that hold several documents: the mask matters
    assert abs(loss - total / (SEQ * WINDOWS)) < 1e-5, (loss, total / (SEQ * WINDOWS))
    assert abs(loss - across / (SEQ * WINDOWS)) > 1e-3


def test_evaluate_bad_input_is_one_line(tmp_path, capsys):
    from nanotronix.evaluate import main  # the command's own entry point, without a new interpreter

    store = write_learnable_store(tmp_path / "store" / "arith", num_docs=5, vocab=TINY.vocab_size)
    model = plain_model()
    save_single(tmp_path / "run", 1, model, adamw(model))
    tokens = np.fromfile(f"{store}.bin", dtype=np.uint16).size
    run, longest = str(tmp_path / "run"), TINY.max_position_embeddings
    cases = [((run, str(tokens), "32"), "error: --num-samples: "),
             ((str(tmp_path / "missing"), "1", "32"), f"error: checkpoint not found: {tmp_path / 'missing'}"),
             ((run, "1", str(longest + 1)),  # the trainer refuses these positions too
              f"error: --seq-len: {longest + 1} exceeds the checkpoint's max_position_embeddings={longest}")]
    if not torch.cuda.is_available():
        cases.append(((run, "1", "32", "--device", "cuda"), "error: --device: cuda requested but CUDA is not"))
    # a damaged int32 store: a negative id is outside the vocabulary too (not the embedding's IndexError)
    damaged = np.fromfile(f"{store}.bin", dtype=np.uint16).astype(np.int32)
    damaged[40] = -1
    writer = MegatronWriter(tmp_path / "damaged", np.int32)
    writer.add_documents(damaged, [len(damaged)])
    writer.finalize({})
    cases.append(((run, "2", "32", "--data", str(tmp_path / "damaged"), "--no-progress"),
                  f"error: --data: {tmp_path / 'damaged'}: token id -1 is outside the model's vocabulary "
                  f"({TINY.vocab_size})"))
    for (checkpoint, samples, seq, *more), message in cases:
        data = more[more.index("--data") + 1] if "--data" in more else str(store)
        more = [m for m in more if m not in ("--data", data)]
        code = main(["--checkpoint", checkpoint, "--data", data, "--seq-len", seq, "--num-samples", samples,
                     *more])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith(message), err


def test_a_store_of_another_tokenizer_than_the_runs_gets_a_note(tmp_path, capsys):
    """The checkpoint's run named a tokenizer file (data.tokenizer) other than the one that wrote the store: the loss
    is still computed, with a note saying so (the ids may mean other tokens)."""
    from nanotronix.evaluate import main

    store = write_learnable_store(tmp_path / "store" / "arith", num_docs=5, vocab=TINY.vocab_size,
                                  tokenizer_sha256="ab" * 32)
    model = plain_model()
    save_single(tmp_path / "run", 1, model, adamw(model))
    (tmp_path / "tokenizer.json").write_text("{}")
    manifest_file = next((tmp_path / "run").glob("step_*/checkpoint.json"))
    manifest = json.loads(manifest_file.read_text())
    manifest["config"].setdefault("data", {})["tokenizer"] = str(tmp_path / "tokenizer.json")
    manifest_file.write_text(json.dumps(manifest))
    assert main(["--checkpoint", str(tmp_path / "run"), "--data", str(store), "--seq-len", "32", "--num-samples",
                 "2", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"note: the checkpoint's run names data.tokenizer {tmp_path / 'tokenizer.json'} (44136fa355b3), another " \
           f"file than the one the store was written with (abababababab: {store}); unless they hold the same " \
           "vocabulary, the loss scores the model on ids that mean other tokens than in its training" in err, err


def test_a_store_of_a_larger_tokenizer_is_refused_up_front(tmp_path, capsys):
    """A store whose sidecar says its tokenizer has more tokens than the model's vocabulary was written with another
    tokenizer; the trainer and its validation refuse it before reading, and so does evaluate now. Before, evaluate
    scored it whenever the first K windows happened to hold only ids below the model's vocabulary (a loss for the
    wrong tokenizer, exit 0) and failed on an id only when it met one."""
    from nanotronix.evaluate import main

    store = write_learnable_store(tmp_path / "store" / "arith", num_docs=5, vocab=TINY.vocab_size)
    meta = tmp_path / "store" / "arith.meta.json"
    sidecar = json.loads(meta.read_text())
    sidecar["tokenizer"]["vocab_size"] = 2 * TINY.vocab_size  # ids in range: only the sidecar tells
    meta.write_text(json.dumps(sidecar))
    model = plain_model()
    save_single(tmp_path / "run", 1, model, adamw(model))
    code = main(["--checkpoint", str(tmp_path / "run"), "--data", str(store), "--seq-len", "32", "--num-samples", "2",
                 "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"error: --data: {store} was tokenized with {2 * TINY.vocab_size} tokens, more than "
                                 f"the model's vocabulary ({TINY.vocab_size}): not the checkpoint's tokenizer"], err


def test_sigterm_while_the_checkpoint_is_read_is_one_line(tmp_path, capsys, monkeypatch):
    """SIGTERM (a scheduler's time limit, `timeout`) while DCP reads the weights: "terminated", exit 143, as at any
    other moment (before: DCP wrapped it in its CheckpointException, said as "error: cannot read checkpoint ... (on
    rank 0: Terminated: )" with the bad-input exit code 2)."""
    import os
    import signal

    from torch.distributed.checkpoint import FileSystemReader

    from nanotronix.evaluate import main

    store = write_learnable_store(tmp_path / "store" / "arith", num_docs=5, vocab=TINY.vocab_size)
    model = plain_model()
    save_single(tmp_path / "run", 1, model, adamw(model))
    real = FileSystemReader.read_data

    def terminated_while_reading(self, plan, planner):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(self, plan, planner)

    monkeypatch.setattr(FileSystemReader, "read_data", terminated_while_reading)
    capsys.readouterr()
    code = main(["--checkpoint", str(tmp_path / "run"), "--data", str(store), "--seq-len", "32", "--num-samples", "2",
                 "--no-progress"])
    assert (code, capsys.readouterr().err.strip().splitlines()) == (143, ["terminated"])
