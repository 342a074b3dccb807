"""Any nanotronix checkpoint -> a Hugging Face `LlamaForCausalLM` folder (what tools/convert_to_hf.py runs).

Tensors stream from the checkpoint (one plain-model tensor at a time, whatever layout saved it) through
`convert.hf_mapping.to_hf` into .safetensors shards, so memory stays bounded by the largest tensor. The tokenizer
files and configs are written first, so that the tokenizer shipped is checked (hf_tokenizer_probes: AutoTokenizer
reads config.json too) before the weights. The folder is built under a hidden temp name and renamed into place at the
end: an interrupted or refused export leaves nothing that looks complete.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from nanotronix.checkpoint.errors import CheckpointError
from nanotronix.checkpoint.hf_tokenizer_files import TOKENIZER_FILES, write_tokenizer_files
from nanotronix.checkpoint.hf_tokenizer_probes import check_tokenizes_as_tokenizer_json
from nanotronix.checkpoint.output_folder import staged_output
from nanotronix.checkpoint.paths import LATEST_NAME, MANIFEST_NAME
from nanotronix.checkpoint.reader import CheckpointReader
from nanotronix.checkpoint.safetensors_stream import StreamingSafetensorsWriter, tensor_nbytes
from nanotronix.config import ModelConfig
from nanotronix.config_checks import validate_model_export
from nanotronix.convert.hf_config_types import refusal
from nanotronix.convert.hf_generation_config import loadable as loadable_generation
from nanotronix.convert.hf_mapping import hf_config_dict, pad_token_refusal, to_hf
from nanotronix.data.tokenizer import local_tokenizer_sha256
from nanotronix.errors import ConfigError, UserError

EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' save_pretrained default ("5GB")
# Keys of an imported model's original config.json that the export recomputes rather than carries over
# (transformers_weights names the imported folder's weight file, which transformers would look for in the export's).
_RECOMPUTED = {"rope_parameters", "rope_scaling", "rope_theta", "dtype", "torch_dtype", "transformers_version",
               "_name_or_path", "transformers_weights"}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    t = text.strip().upper()
    size = None
    for unit, factor in units.items():
        if t.endswith(unit) and t.isascii() and t[:-len(unit)].strip().replace(".", "", 1).isdigit():
            size = int(float(t[:-len(unit)]) * factor)
            break
    if size is None and t.isascii() and t.isdigit():
        size = int(t)
    if size is None:
        raise UserError(f"--max-shard-size: cannot read {text!r} (examples: 5GB, 500MB, 2GiB)")
    if size < 1:
        raise UserError(f"--max-shard-size: must be more than 0 bytes, got {text!r}")
    return size


def plan_tensors(reader: CheckpointReader, dtype: torch.dtype) -> list[tuple[str, torch.Size, str]]:
    """(HF name, shape, source parameter) for every exported tensor, in file order, without reading data:
    the mapping runs on meta tensors."""
    cfg = reader.model_config
    plan = []
    for name in reader.parameter_names:
        for hf_name, t in to_hf(name, torch.empty(reader.shape(name), device="meta"), cfg):
            plan.append((hf_name, t.shape, name))
    return plan


def split_shards(plan: list[tuple[str, torch.Size, str]], dtype: torch.dtype,
                 max_bytes: int) -> list[list[tuple[str, torch.Size, str]]]:
    shards: list[list] = [[]]
    size = 0
    for entry in plan:
        n = tensor_nbytes(entry[1], dtype)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += n
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _transformers_version() -> Optional[str]:
    try:
        import transformers
        return transformers.__version__
    except ImportError:
        return None


def export_to_hf(checkpoint: str | os.PathLike, output: str | os.PathLike, dtype: str = "float32",
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, tokenizer: Optional[str] = None,
                 overwrite: bool = False, progress: bool = True,
                 log: Callable[[str], None] = print) -> Path:
    if dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype: {dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    output = Path(output)
    reader = CheckpointReader(checkpoint)
    cfg, manifest = reader.model_config, reader.manifest
    try:  # a checkpoint of a run started before its config was checked for this (init_std past 1)
        validate_model_export(cfg)
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {reader.folder}: {MANIFEST_NAME}: {e}") from None
    torch_dtype = EXPORT_DTYPES[dtype]
    source_hf = _without_refused_fields((manifest.get("source") or {}).get("hf") or {}, cfg,
                                        reader.folder / MANIFEST_NAME, log)

    # the run's folder when the step lies in one: an export among its step folders would be in the way of its
    # pruning, rollback and copies
    in_run = reader.folder.parent if (reader.folder.parent / LATEST_NAME).is_file() else reader.folder
    with staged_output(output, in_run, overwrite, lambda old: (old / "config.json").is_file(),
                       "a Hugging Face model folder (no config.json)") as temp:
        _write_tokenizer_and_configs(temp, tokenizer, manifest, source_hf, cfg, dtype, log)
        _write_weights(reader, temp, torch_dtype, max_shard_bytes, progress)
    log(f"exported step {reader.step} of {reader.folder} to {output} ({dtype})")
    return output


def _without_refused_fields(source_hf: dict, cfg: ModelConfig, manifest_file: Path,
                            log: Callable[[str], None]) -> dict:
    """An imported model's source.hf, less the fields of its config.json that the export would carry into its own
    (those nanotronix does not model, and the token ids) holding a value transformers refuses (by type, or a
    pad_token_id outside the vocabulary), and those of its generation_config.json GenerationConfig refuses
    (`"early_stopping": "x"`), each said in a warning. Only an import made before the import refused them holds one
    (`"pad_token_id": 1.0`). Left out rather than refused: the value comes from a folder transformers itself
    could not load, so it never meant anything to transformers, and a refusal would leave the run that continued from
    the import exportable only by editing its manifest by hand; without it, config.json says what transformers
    defaults to (a token id: the tokenizer's)."""
    computed = hf_config_dict(cfg).keys() - {"bos_token_id", "eos_token_id"}  # the ids are taken from the import

    def refused_value(field: str, value: Any) -> Optional[str]:
        if field in computed or field in _RECOMPUTED:  # not carried over
            return None
        said = refusal(field, value)
        return said or (pad_token_refusal(value, cfg.vocab_size) if field == "pad_token_id" else None)

    imported = source_hf.get("config") or {}
    refused = {field: said for field, value in imported.items() if (said := refused_value(field, value))}
    for said in refused.values():
        log(f"warning: {manifest_file}: source.hf.config: {said} (imported before the import refused it): left out "
            "of config.json")
    if refused:
        source_hf = {**source_hf, "config": {k: v for k, v in imported.items() if k not in refused}}
    generation = source_hf.get("generation_config")
    if generation:  # its values GenerationConfig refuses, left out alike
        source_hf = {**source_hf, "generation_config": loadable_generation(generation, lambda _, said: log(
            f"warning: {manifest_file}: source.hf.generation_config: {said} (imported before the import refused it): "
            "left out of generation_config.json"))}
    return source_hf


def _write_tokenizer_and_configs(folder: Path, tokenizer: Optional[str], manifest: dict, source_hf: dict,
                                 cfg: ModelConfig, dtype: str, log: Callable[[str], None]) -> Any:
    """The tokenizer (_write_tokenizer), then config.json and generation_config.json with its ids, then the check that
    the folder, as AutoTokenizer loads it (config.json steers its choice of class too), tokenizes and decodes as its
    tokenizer.json does; one that does not is handled as _write_tokenizer handles a tokenizer it cannot ship (the
    configs then written again without it). Its info, or None when no tokenizer is shipped."""
    info, bos_id, eos_id = _write_tokenizer(folder, tokenizer, manifest, source_hf, cfg, log)
    _write_configs(folder, cfg, dtype, source_hf, info, bos_id, eos_id, log)
    if info is None:
        return None
    named = Path(info.file).parent / "tokenizer_config.json"  # what decides the class, else the export's own
    try:
        check_tokenizes_as_tokenizer_json(folder, named if named.is_file() else Path(info.file), log)
        return info
    except UserError as e:
        if tokenizer:
            raise
        _leave_out_tokenizer(folder, e, log)
    _write_configs(folder, cfg, dtype, source_hf, None, None, None, log)
    return None


def _leave_out_tokenizer(folder: Path, why: UserError, log: Callable[[str], None]) -> None:
    """The run's own tokenizer cannot be shipped: the model is exported without it, in a warning."""
    for name in TOKENIZER_FILES:
        (folder / name).unlink(missing_ok=True)
    log(f"warning: tokenizer files not written ({why})")


def _check_the_stores_tokenizer(spec: str, asked: bool, manifest: dict) -> Optional[str]:
    """The tokenizer about to be shipped against the tokenizer files the run's token stores were written with (their
    sha256, which the checkpoint keeps): the run's data.tokenizer rewritten since it trained (a tokenizer retrained
    into the same path) would ship ids that mean other tokens, with no word. Refused for the run's own; `--tokenizer`
    or an imported model's own (`asked`) is shipped, with a warning (two files can hold the same vocabulary): its
    text is returned, said once the tokenizer is shipped (before a refusal of it, it contradicted the error line)."""
    kept = (manifest.get("data") if isinstance(manifest.get("data"), dict) else {}).get("store_tokenizers")
    recorded = sorted({sha for sha in kept.values() if isinstance(sha, str)} if isinstance(kept, dict) else ())
    mine = local_tokenizer_sha256(spec)
    if not recorded or mine is None or mine in recorded:
        return None
    said = (f"tokenizer {spec} ({mine[:12]}) is another file than the one the run's token stores were written with "
            f"({', '.join(sha[:12] for sha in recorded)})")
    if asked:
        return f"warning: {said}; shipped as asked: unless they hold the same vocabulary, its ids mean other tokens"
    raise UserError(f"{said}: rewritten since the run trained? Pass --tokenizer with the stores' tokenizer (or this "
                    "one, to ship it all the same)")


def _write_tokenizer(folder: Path, tokenizer: Optional[str], manifest: dict, source_hf: dict, cfg: ModelConfig,
                     log: Callable[[str], None]) -> tuple[Any, Optional[int], Optional[int]]:
    """Ship a tokenizer into `folder`: `tokenizer` when given, else the run's data.tokenizer, else an imported
    model's own; its info, BOS and EOS ids, or three Nones when none is shipped. One asked for that cannot be shipped
    is an error; the run's own, a warning (the model is exported without it). The run's data.tokenizer that is
    another file than its stores' is refused; another one, a warning (_check_the_stores_tokenizer)."""
    tokenizer_spec = tokenizer or (manifest["config"].get("data") or {}).get("tokenizer")
    imported_tokenizer = Path(source_hf["path"]) if source_hf.get("path") else None
    the_imported = False
    if not tokenizer_spec and imported_tokenizer and (imported_tokenizer / "tokenizer.json").is_file():
        tokenizer_spec, the_imported = str(imported_tokenizer), True  # a run from an import naming no data.tokenizer
        log(f"note: the run names no data.tokenizer; shipping the imported model's ({imported_tokenizer})")
    if not tokenizer_spec:
        return None, None, None
    # the imported model's own is no file the run named (its stores may hold a re-saved copy): a warning, as asked
    warning = _check_the_stores_tokenizer(tokenizer_spec, bool(tokenizer) or the_imported, manifest)
    try:
        info, bos_id, eos_id = write_tokenizer_files(tokenizer_spec, folder, cfg.max_position_embeddings)
        if info.vocab_size > cfg.vocab_size:  # its ids past the embedding: an IndexError in generate()
            raise UserError(f"tokenizer {tokenizer_spec} has {info.vocab_size} tokens, more than the "
                            f"model's vocabulary ({cfg.vocab_size}): not the model's tokenizer")
        if warning:
            log(warning)
        # no BOS named: its EOS (SmolLM2's tokenizer uses <|endoftext|> for both); no EOS: the data pipeline's
        return info, info.eos_id if bos_id is None else bos_id, info.eos_id if eos_id is None else eos_id
    except UserError as e:
        if tokenizer:  # asked for explicitly: an error; the run's own: export the model anyway
            raise
        _leave_out_tokenizer(folder, e, log)
        return None, None, None


def _write_configs(folder: Path, cfg: ModelConfig, dtype: str, source_hf: dict, info: Any, bos_id: Optional[int],
                   eos_id: Optional[int], log: Callable[[str], None]) -> None:
    """config.json and generation_config.json: the token ids an imported model's config.json gave, else the shipped
    tokenizer's, else 0 (a shipped tokenizer other than the imported model's own, whose ids differ from them: its
    ids, in a note); the fields of an imported model's config that nanotronix does not model carried over."""
    imported = source_hf.get("config", {})
    if info is None and not {"eos_token_id", "bos_token_id"} <= imported.keys():
        log("warning: no tokenizer, so bos_token_id and eos_token_id in config.json are set to 0 (SmolLM2's "
            "<|endoftext|>): pass --tokenizer to have the tokenizer's own")
    eos = imported.get("eos_token_id", eos_id if info else 0)
    bos = imported.get("bos_token_id", bos_id if info else 0)
    generation = source_hf.get("generation_config")
    if info is not None and not _is_imported_tokenizer(info, source_hf) and not (
            _names_id(eos, eos_id) and _names_id(bos, bos_id)):
        log(f"note: bos_token_id {bos_id} and eos_token_id {eos_id} are the shipped tokenizer's, not the imported "
            f"model's ({bos} and {eos}): generate() stops at the tokenizer's EOS")
        eos, bos = eos_id, bos_id
        generation = generation and {**generation, "bos_token_id": bos, "eos_token_id": eos}
    config = hf_config_dict(cfg, eos_token_id=eos, bos_token_id=bos, torch_dtype=dtype)
    for key, value in source_hf.get("config", {}).items():
        if key not in config and key not in _RECOMPUTED:
            config[key] = value  # fields of an imported model's config that nanotronix does not model
    version = _transformers_version()
    if version:
        config["transformers_version"] = version
    generation = generation or {"_from_model_config": True, "bos_token_id": bos, "eos_token_id": eos}
    if version:
        generation = {**generation, "transformers_version": version}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def _is_imported_tokenizer(info: Any, source_hf: dict) -> bool:
    """Whether the shipped tokenizer is the imported model's own folder's (its config's ids then stay, as imported)."""
    imported = source_hf.get("path")
    return bool(imported) and Path(info.file).resolve().parent == Path(imported).resolve()


def _names_id(config_value: Any, token_id: int) -> bool:
    """Whether a config.json id field (an integer, or a list as Llama 3's eos_token_id) names `token_id`."""
    return config_value == token_id or (isinstance(config_value, list) and token_id in config_value)


def _write_weights(reader: CheckpointReader, folder: Path, dtype: torch.dtype, max_bytes: int,
                   progress: bool) -> None:
    from tqdm import tqdm

    plan = plan_tensors(reader, dtype)
    shards = split_shards(plan, dtype, max_bytes)
    names = shard_file_names(len(shards))
    total = sum(tensor_nbytes(shape, dtype) for _, shape, _ in plan)
    cfg = reader.model_config
    with tqdm(total=total, unit="B", unit_scale=True, desc="export", disable=not progress) as bar:
        pending: list[tuple[str, torch.Tensor]] = []  # HF tensors of the source read last, not yet written
        for shard, file_name in zip(shards, names):
            writer = StreamingSafetensorsWriter(folder / file_name, [(n, s, dtype) for n, s, _ in shard],
                                                {"format": "pt"})
            for hf_name, _, source in shard:
                if not pending or pending[0][0] != hf_name:
                    tensor = reader.tensors([source])[source]
                    pending = [(n, t.to(dtype)) for n, t in to_hf(source, tensor, cfg)]
                name, tensor = pending.pop(0)
                if name != hf_name:
                    raise CheckpointError(f"export: expected {hf_name}, the mapping produced {name}")
                writer.write(name, tensor)
                bar.update(tensor.numel() * tensor.element_size())
            writer.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {n: file_name for shard, file_name in zip(shards, names) for n, _, _ in shard}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
