"""A Hugging Face Llama folder (SmolLM2 included) -> a nanotronix checkpoint to continue training from.

The result is a run folder (`OUTPUT/step_0000000/` + `latest`) holding the weights in fp32, no optimizer state,
step 0 and no consumed data, so `checkpoint.resume: OUTPUT` starts a run from the released weights (for example
the 8k context-extension stage with `model.rope_theta: 130000`). The original config.json, generation config and
tokenizer location are kept in the manifest so that exporting the checkpoint again returns the same folder.

Memory stays bounded by one fused tensor: DCP plans the save on meta tensors and a planner reads each tensor from
the safetensors files only when DCP writes it.
"""
from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from nanotronix.checkpoint import manifest as mf
from nanotronix.checkpoint import paths, run_lock
from nanotronix.checkpoint.errors import CheckpointError
from nanotronix.checkpoint.hf_weights import FLOAT_DTYPES, SafetensorsFolder, read_as
from nanotronix.checkpoint.output_folder import staged_output
from nanotronix.checkpoint import state as st
from nanotronix.checkpoint.reader import model_parameter_shapes
from nanotronix.checkpoint.storage import Collective, failures_of
from nanotronix.config import Config, ModelConfig
from nanotronix.convert.hf_mapping import from_hf, model_config_from_hf, read_json_object, to_hf
from nanotronix.convert.hf_generation_config import refusal as generation_refusal
from nanotronix.errors import UserError, number_text
from nanotronix.model.rope import ROPE_LAYOUT


_LAYER_NAME = re.compile(r"model\.layers\.([0-9]+)\.")  # a decoder layer's tensor, as LlamaForCausalLM names it


class _LazyPlanner(DefaultSavePlanner):
    """Plans on meta tensors; produces each tensor's data only when DCP writes it."""

    def __init__(self, produce: Callable[[str], torch.Tensor]):
        super().__init__()
        self.produce = produce

    def lookup_object(self, index):
        return self.produce(index.fqn)


def import_from_hf(hf_dir: str | os.PathLike, output: str | os.PathLike, overwrite: bool = False,
                   log: Callable[[str], None] = print, progress: bool = False) -> Path:
    hf_dir, output = Path(hf_dir), Path(output)
    hf_config, model_cfg = _read_hf_config(hf_dir)
    source = SafetensorsFolder(hf_dir, hf_config.get("transformers_weights"))
    state, used = _check_weights(hf_dir, source, model_cfg)
    _warn_unused(hf_dir, source, used, model_cfg, log)
    manifest = _import_manifest(hf_dir, hf_config, model_cfg)
    with _no_run_in(output, overwrite, log), staged_output(
            output, hf_dir, overwrite, _is_an_import,
            "an earlier import (a checkpoint folder holding step 0 only)") as staging:
        _write_step_0(hf_dir, source, model_cfg, state, manifest, staging, output, progress)
    log(f"imported {hf_dir} ({model_cfg.num_parameters() / 1e6:.1f}M parameters) as {output / 'step_0000000'}")
    return output


def _read_hf_config(hf_dir: Path) -> tuple[dict, ModelConfig]:
    """hf_dir's config.json as read, and the model it describes; UserError for a missing, unreadable or quantized
    one, or one describing a model this one does not compute."""
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise UserError(f"--hf: {hf_dir} has no config.json (expected a Hugging Face model folder)")
    try:
        hf_config = read_json_object(config_file)
        model_cfg = model_config_from_hf(hf_config)
    except KeyError as e:
        raise UserError(f"--hf: {config_file}: field {e.args[0]!r} is missing") from None
    except (ValueError, TypeError, AttributeError) as e:  # not JSON, not a mapping, not a Llama
        raise UserError(f"--hf: {config_file}: {e}") from None
    except RecursionError:  # nested deeper than the JSON reader recurses
        raise UserError(f"--hf: {config_file}: nested too deeply to be read") from None
    quantization = hf_config.get("quantization_config")
    if quantization is not None:  # its weights are integers plus scales this model has no place for
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else "?"
        raise UserError(f"--hf: {hf_dir} is a quantized model (quantization_config: {method}); convert from its "
                        "unquantized weights")
    return hf_config, model_cfg


def _check_weights(hf_dir: Path, source: SafetensorsFolder,
                   model_cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The model's parameters as fp32 meta tensors (the state to save), and the names of the source tensors they are
    read from; UserError, before anything is written, unless the source holds each of them (in one file, or in files
    alike), of the shape config.json gives it, in floating point, and no biases."""
    held = _held_layers(source)
    if model_cfg.num_hidden_layers > held:  # said before the model is built: a config.json with 10**30 layers hung
        raise UserError(f"--hf: {hf_dir} lacks tensors model.layers.{held}.*: its config.json gives "
                        f"{number_text(model_cfg.num_hidden_layers)} decoder layers, its weights hold {held}")
    biases = sorted(name for name in source.location if name.endswith(".bias"))
    if biases:  # the config did not say so, but the weights have biases the model would drop
        raise UserError(f"--hf: {hf_dir} holds bias tensors ({biases[0]}, ...), which this model does not have")
    if not model_cfg.tie_word_embeddings and "lm_head.weight" not in source:  # a base LlamaModel's folder, untied
        raise UserError(f"--hf: {hf_dir} has untied embeddings but no lm_head.weight (transformers would initialise "
                        "the head at random)")
    if model_cfg.tie_word_embeddings:
        source.read_embedding_from_head()
    embedding = [model_cfg.vocab_size, model_cfg.hidden_size]
    if model_cfg.tie_word_embeddings and "lm_head.weight" in source and source.shape("lm_head.weight") != embedding:
        # the tied head is the embedding (its copy is not read), but a head of another shape says the config does
        # not describe these weights: transformers refuses it too
        raise UserError(f"--hf: {hf_dir}: tensor {source.said_as('lm_head.weight')} is "
                        f"{source.shape('lm_head.weight')}, but its config.json ties it to the embedding, {embedding}")
    if model_cfg.tie_word_embeddings and "lm_head.weight" in source and \
            not torch.equal(source["lm_head.weight"].float(), source["model.embed_tokens.weight"].float()):
        # a head trained apart from the embedding: transformers 5 then unties them and computes with it, 4 ties them
        raise UserError(f"--hf: {hf_dir}: its config.json ties the head to the embedding, but its "
                        f"{source.said_as('lm_head.weight')} holds other values: transformers 5 computes with that "
                        "head, transformers 4 with the embedding; set tie_word_embeddings: false in its config.json to "
                        "import the head, or remove the head from the weights")
    state = {st.model_key(n): torch.empty(shape, dtype=torch.float32, device="meta")
             for n, shape in model_parameter_shapes(model_cfg).items()}
    used = set()
    for key, tensor in state.items():
        for hf_name, expected in to_hf(key[len(st.MODEL_PREFIX):], tensor, model_cfg):
            read = source.name_of(hf_name)  # hf_name, or the name transformers renames to it (a base model's)
            if read is None:
                raise UserError(f"--hf: {hf_dir} lacks tensor {hf_name}")
            differing = source.differing_copy(hf_name)
            if differing:  # which one is read depends on the reader's order of the files or the names
                file, name, how = differing
                where = source.location[read] + ("" if read == hf_name else f" as {read}")
                held = f"in both {file} and {where}" if name == read else f"in {file} as {name}, which " \
                    f"transformers reads as {hf_name}, and in {where}"
                raise UserError(f"--hf: {hf_dir}: tensor {hf_name} is {held}, with different {how}: which one is "
                                "read depends on the reader")
            shown = source.said_as(hf_name)
            if source.shape(hf_name) != list(expected.shape):
                raise UserError(f"--hf: {hf_dir}: tensor {shown} is {source.shape(hf_name)}, but its config.json "
                                f"makes it {list(expected.shape)}")
            if source.dtype(hf_name) not in FLOAT_DTYPES:
                raise UserError(f"--hf: {hf_dir}: tensor {shown} is {source.dtype(hf_name)}, not floating point "
                                "(a quantized model? convert from its unquantized weights)")
            used.update([read, *source.aliases(hf_name)])  # its other names hold the same (differing_copy)
    return state, used


def _held_layers(source: SafetensorsFolder) -> int:
    """How many decoder layers the source holds from layer 0 on (model.layers.0., .1., ... without a gap, by the
    names transformers reads them as: layers.0. of a base LlamaModel's folder)."""
    names = (read_as(name, _LAYER_NAME.match) for name in source.location)
    indices = {int(m.group(1)) for m in map(_LAYER_NAME.match, names) if m}
    return next(i for i in range(len(indices) + 1) if i not in indices)


def _warn_unused(hf_dir: Path, source: SafetensorsFolder, used: set[str], model_cfg: ModelConfig,
                 log: Callable[[str], None]) -> None:
    """Say the source's tensors that are not imported, as weights the model has no place for. Left out unsaid: what
    older transformers saved of RoPE (rotary_emb.inv_freq, recomputed from rope_theta), a tied model's copy of the
    embedding (under any name transformers reads as lm_head.weight)."""
    head = {"lm_head.weight", *source.aliases("lm_head.weight")} if model_cfg.tie_word_embeddings else set()
    unused = sorted(n for n in source.location if n not in used and not n.endswith("rotary_emb.inv_freq")
                    and n not in head)
    if unused:
        log(f"warning: {len(unused)} tensor(s) of {hf_dir} not imported, which this model has no place for: "
            f"{', '.join(unused[:3])}{', ...' if len(unused) > 3 else ''}")


def _import_manifest(hf_dir: Path, hf_config: dict, model_cfg: ModelConfig) -> dict:
    """Step 0's manifest, less its file digests: no optimizer state, no consumed data, and the original config.json,
    generation config and tokenizer location, so that exporting the checkpoint again returns the same folder."""
    config = Config(model=model_cfg).to_dict()
    if (hf_dir / "tokenizer.json").is_file():
        config["data"]["tokenizer"] = str(hf_dir.resolve())
    return {
        "step": 0, "consumed_samples": 0, "data": {}, "config": config,
        "layout": {"tp": 1, "pp": 1, "dp": 1, "world_size": 1}, "rope_layout": ROPE_LAYOUT,
        "optimizer": False, "optimizer_step": 0, "torch_version": torch.__version__,
        "source": {"hf": {"path": str(hf_dir.resolve()), "config": hf_config,
                          "generation_config": _read_generation_config(hf_dir)}},
    }


def _read_generation_config(hf_dir: Path) -> dict | None:
    """hf_dir's generation_config.json as read, None when there is none; UserError for one that transformers cannot
    load either: not JSON, not an object (one the export would fail on), or holding a value GenerationConfig refuses
    (one the export would write back into a folder transformers cannot load)."""
    generation_file = hf_dir / "generation_config.json"
    if not generation_file.is_file():
        return None
    try:
        generation = read_json_object(generation_file)
        refused = generation_refusal(generation)
    except ValueError as e:
        raise UserError(f"--hf: {generation_file}: {e}") from None
    except RecursionError:  # nested deeper than the JSON reader, or the rules walking its mappings, recurse
        raise UserError(f"--hf: {generation_file}: nested too deeply to be read") from None
    if refused:
        raise UserError(f"--hf: {generation_file}: {refused[1]}")
    return generation


def _write_step_0(hf_dir: Path, source: SafetensorsFolder, model_cfg: ModelConfig, state: dict[str, torch.Tensor],
                  manifest: dict, staging: Path, output: Path, progress: bool) -> None:
    """Save `state`, read from `source` tensor by tensor, as step 0 of the run folder `staging` with its manifest
    (`staged_output` then puts `staging` in `output`'s place, or removes it on failure)."""
    temp = paths.temp_folder(staging, 0)
    temp.mkdir()
    # the bar starts once the output is known to be writable: an output refused before is its error line alone
    from tqdm import tqdm
    bar = tqdm(total=sum(t.numel() for t in state.values()), unit="param", unit_scale=True, desc="import",
               disable=not progress)
    not_finite: list[str] = []

    def produce(key: str) -> torch.Tensor:
        name = key[len(st.MODEL_PREFIX):]
        tensor = from_hf(name, lambda hf_name: source[hf_name].float(), model_cfg).contiguous()
        if not torch.isfinite(tensor).all():  # a model that diverged before it was saved (raised after the write:
            not_finite.append(name)  # DCP would wrap an error raised here in its own)
        bar.update(tensor.numel())
        return tensor

    try:
        try:
            Collective(single_process=True).save(state, temp, planner=_LazyPlanner(produce))
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            # DCP wraps what stopped the write (SIGTERM, Ctrl-C, a full disk) in its CheckpointException; raised as
            # itself, the command says it in one line, as it does at any other moment
            failures = failures_of(e)
            if not failures:
                raise
            raise failures[0][1] from None
        if not_finite:
            raise UserError(f"--hf: {hf_dir}: the weights of {not_finite[0]} hold NaN or infinite values")
        manifest["files"] = mf.digest_files(temp, mf.list_files(temp))
        mf.write_manifest(temp, manifest)
        paths.commit_step(temp, staging, 0)
    finally:
        bar.close()


@contextmanager
def _no_run_in(output: Path, overwrite: bool, log: Callable[[str], None]) -> Iterator[None]:
    """With --overwrite of an earlier import: the folder's run lock (run_lock), held until the new folder is in its
    place. A run training from the import (its checkpoint.dir, no step saved yet) holds it for the run's life:
    replaced under it, the folder would get that run's steps, trained from the old weights, beside the new step 0,
    and the lock would no longer cover it. Refused then; and no run starts from the old folder meanwhile."""
    held = None
    if overwrite and output.is_dir() and not output.is_symlink() and _is_an_import(output):
        held = run_lock.acquire(output, 0.0, log, "a run is training from it (its checkpoint.dir): import into "
                                "another folder, or wait for the run to end", name="--output")
    try:
        yield
    finally:
        if held is not None:
            os.close(held)


def _is_an_import(folder: Path) -> bool:
    """What `--overwrite` may replace: a folder holding nothing but an import's step 0, the `latest` pointer and the
    lock of a run that trained from it without saving (not a training run, not steps that tools/rollback.py set
    aside, not the user's other files)."""
    steps = paths.committed_steps(folder)
    if [paths.step_of(p) for p in steps] != [0]:
        return False
    if {p.name for p in folder.iterdir()} - {steps[0].name, paths.LATEST_NAME, paths.LOCK_NAME}:
        return False
    try:
        manifest = mf.read_manifest(steps[0])
    except (CheckpointError, OSError):  # unreadable: not known to be an import
        return False
    return "hf" in (manifest.get("source") or {}) and manifest.get("optimizer") is False
