"""Config parsing, presets, overrides and validation (pure Python, < 1 s)."""
import datetime
import sys
from pathlib import Path

import pytest
import yaml

from nanotronix.config import ConfigError, config_notes, grad_accum_steps, load_config
from nanotronix.config_checks import resolve_layout

TINY = {
    "model": {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 128, "rope_theta": 10000.0,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "init_std": 0.02},
    "train": {"seq_len": 32, "global_batch_size": 8, "micro_batch_size": 2, "train_steps": 3},
    "data": {"stages": [{"name": "s1", "start_step": 1, "datasets": [{"path": "x", "weight": 1.0}]}]},
}


@pytest.fixture
def tiny_yaml(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def test_presets_have_published_architecture():
    # SmolLM2 HF config.json values (the Hub's HuggingFaceTB/SmolLM2-* model repositories).
    expected = {
        "smollm2-135m": (576, 1536, 30, 9, 3),
        "smollm2-360m": (960, 2560, 32, 15, 5),
        "smollm2-1.7b": (2048, 8192, 24, 32, 32),
    }
    for preset, (d, f, layers, heads, kv) in expected.items():
        m = load_config(None, [f"model.preset={preset}"]).model
        assert (m.hidden_size, m.intermediate_size, m.num_hidden_layers, m.num_attention_heads,
                m.num_key_value_heads) == (d, f, layers, heads, kv)
        assert m.vocab_size == 49152 and m.tie_word_embeddings and m.rms_norm_eps == 1e-5 and m.head_dim == 64
    # nanotron's init std (what training uses) and the release's config.json initializer_range differ for 360M
    # (huggingface/smollm's nanotron configs against the Hub's config.json): an export says what the release says
    from nanotronix.convert.hf_mapping import hf_config_dict
    published = {"smollm2-135m": (0.041666666666666664, 0.041666666666666664), "smollm2-360m": (0.03227, 0.02),
                 "smollm2-1.7b": (0.02, 0.02)}
    for preset, (init_std, initializer_range) in published.items():
        m = load_config(None, [f"model.preset={preset}"]).model
        assert (m.init_std, hf_config_dict(m)["initializer_range"]) == (init_std, initializer_range), preset


def test_preset_fields_can_be_overridden():
    m = load_config(None, ["model.preset=smollm2-135m", "model.num_hidden_layers=2"]).model
    assert m.num_hidden_layers == 2 and m.hidden_size == 576


def test_an_override_that_yaml_would_cut_at_a_comment_is_refused(tiny_yaml):
    """An override's value is YAML, where ' #' starts a comment: `checkpoint.dir=/runs/exp #2` was `/runs/exp`,
    another run's folder, without a word (the Slurm scripts passed their folders so). Refused, naming what it would
    drop; quoted, or with a '#' YAML keeps (no space before it), the value is taken whole."""
    with pytest.raises(ConfigError, match=r"override 'checkpoint.dir=/runs/exp #2': YAML reads ' #' as the start of "
                                          r"a comment, which drops '#2' from the value: quote it \(checkpoint.dir="):
        load_config(tiny_yaml, ["checkpoint.dir=/runs/exp #2"])
    with pytest.raises(ConfigError, match="which drops '# 7'"):
        load_config(tiny_yaml, ["train.seed=3 # 7"])
    cfg = load_config(tiny_yaml, ["checkpoint.dir='/runs/exp #2: a'", "logging.dir=/runs/exp#2"])
    assert (cfg.checkpoint.dir, cfg.logging.dir) == ("/runs/exp #2: a", "/runs/exp#2")


def test_a_list_item_override_of_a_list_the_file_leaves_at_its_default(tiny_yaml):
    """The README's "list items by index" on a list the config file does not write out (optimizer.betas,
    logging.profile_ranks at their defaults) was refused as "expected a list, got {'1': 0.99}"; it now sets that
    item of the default list, and an index past it is the usual one line."""
    cfg = load_config(tiny_yaml, ["optimizer.betas.1=0.99", "logging.profile_ranks.0=1"])
    assert cfg.optimizer.betas == [0.9, 0.99] and cfg.logging.profile_ranks == [1]
    with pytest.raises(ConfigError, match=r"^optimizer\.betas\.2: no list item '2' \(the list has 2\)$"):
        load_config(tiny_yaml, ["optimizer.betas.2=0.9"])
    with pytest.raises(ConfigError, match=r"^optimizer\.betas: expected a list, got \{'a': 1\}$"):
        load_config(tiny_yaml, ["optimizer.betas={a: 1}"])


def test_a_tilde_in_dataset_validation_and_tokenizer_paths_is_the_home_folder(tmp_path, tiny_yaml, monkeypatch):
    """`data.stages.0.datasets.0.path=~/x` (bash leaves `~` after `=`) stayed '~/x': the same store got another
    dataset key than /home/u/x (another sample order on a resume that spells it so, two datasets in the metrics),
    validation could score one store twice, and data.tokenizer was saved unexpanded into checkpoints."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "tok.json").write_text("{}")
    cfg = load_config(tiny_yaml, ["data.root=~/corpus", "data.stages.0.datasets.0.path=~/store/tokens",
                                  "validation.data=[~/store/tokens, store/tokens]", "data.tokenizer=~/tok.json"])
    assert cfg.data.root == str(tmp_path / "corpus")
    assert cfg.data.stages[0].datasets[0].path == str(tmp_path / "store" / "tokens")
    assert cfg.validation.data == [str(tmp_path / "store" / "tokens"), str(tmp_path / "corpus" / "store" / "tokens")]
    assert cfg.data.tokenizer == str(tmp_path / "tok.json")
    # a checkpoint keyed before the expansion (its key '~/store/tokens', as written) resumes in the same order
    from nanotronix.data.schedule import dataset_order_key
    assert dataset_order_key(str(tmp_path / "store" / "tokens"), cfg.data.root, ["~/store/tokens.bin"]) == \
        "~/store/tokens.bin"


def test_a_string_field_given_what_yaml_reads_as_a_number_keeps_the_text(tmp_path, tiny_yaml):
    """YAML 1.1 reads `2024_01` as 202401, `010` as 8, `0x10` as 16, `1:30` as 90: a dataset path or stage name
    typed so became another string ('202401': another folder, which a run would read if it existed), in a config
    file and on the command line alike. A string field now takes the text as written; number fields are unchanged."""
    import yaml
    cfg = load_config(tiny_yaml, ["data.stages.0.datasets.0.path=2024_01", "data.stages.0.name=0001",
                                  "checkpoint.dir=0x10", "logging.dir=1:30", "train.train_steps=1_000"])
    assert cfg.data.stages[0].datasets[0].path.rsplit("/", 1)[-1] == "2024_01", cfg.data.stages[0].datasets[0].path
    assert (cfg.data.stages[0].name, cfg.train.train_steps) == ("0001", 1000)
    # a step field takes a number YAML read as its value: `1_000` is step 1000, as before (its text would be refused)
    from nanotronix.config_checks import skipped_step_ranges
    steps = load_config(tiny_yaml, ["train.train_steps=2000", "train.skip_steps=[1_000, 5-7]",
                                    "logging.profile_steps=+5"])
    assert skipped_step_ranges(steps.train) == [(5, 7), (1000, 1000)] and steps.logging.profile_steps == "5"
    assert cfg.checkpoint.dir.endswith("0x10") and cfg.logging.dir.endswith("1:30")
    tree = yaml.safe_load(tiny_yaml.read_text())
    tree["data"]["stages"][0]["datasets"][0]["path"] = "REPLACED"
    text = yaml.safe_dump(tree).replace("REPLACED", "010")
    (tmp_path / "numbers.yaml").write_text(text)
    from_file = load_config(tmp_path / "numbers.yaml")
    path = from_file.data.stages[0].datasets[0].path
    assert path.rsplit("/", 1)[-1] == "010", path
    assert load_config(tmp_path / "numbers.yaml", ["optimizer.betas=[0.9, 0.95]"]).optimizer.betas == [0.9, 0.95]


@pytest.mark.parametrize("value", ["&a [*a]", "&a {k: *a}", "&a [1, '#', *a]"])
def test_an_override_holding_itself_is_one_line(tiny_yaml, value):
    """A YAML alias inside its own anchor (`&a [*a]`) is a value that contains itself: the comment check counted its
    '#'s through json.dumps, which raised 'Circular reference detected' (a traceback on every rank)."""
    with pytest.raises(ConfigError, match=r"^model\.preset: expected a string, got "):
        load_config(tiny_yaml, [f"model.preset={value}"])


def test_dotted_overrides_reach_nested_lists(tiny_yaml):
    cfg = load_config(tiny_yaml, ["train.train_steps=20", "parallel.tp=2", "data.stages.0.datasets.0.path=/d",
                                  "optimizer.betas=[0.8, 0.9]", "optimizer.lr=1e-3"])
    assert cfg.train.train_steps == 20 and cfg.parallel.tp == 2
    assert cfg.data.stages[0].datasets[0].path == "/d"
    assert cfg.optimizer.betas == [0.8, 0.9] and cfg.optimizer.lr == 1e-3


@pytest.mark.parametrize("override, field", [
    ("model.hidden_sise=3", "model.hidden_sise: unknown config key"),
    ("bogus.x=1", "bogus: unknown config key"),
    ("model.hidden_size=66", "model.hidden_size: 66 is not divisible by model.num_attention_heads=4"),
    ("model.num_key_value_heads=3", "model.num_attention_heads: 4 is not a multiple of model.num_key_value_heads=3"),
    ("train.micro_batch_size=3", "train.global_batch_size: 8 is not divisible by train.micro_batch_size=3"),
    ("train.dtype=fp16", "train.dtype"),
    ("train.seq_len=abc", "train.seq_len: expected an integer"),
    ("parallel.pp_schedule=gpipe", "parallel.pp_schedule"),
    ("lr_schedule.decay_style=exp", "lr_schedule.decay_style"),
    ("data.stages.0.datasets.0.weight=-1", "data.stages.0.datasets.0.weight: must be positive"),
    ("data.stages.3.name=x", "data.stages.3: no list item"),
    ("model.preset=smollm2-7b", "model.preset: unknown preset"),
    # a first stage at step 0 is at step 1: a second one there would silently replace it
    ("data.stages=[{name: a, start_step: 0, datasets: [{path: x}]}, {name: b, start_step: 1, datasets: [{path: y}]}]",
     "data.stages.1.start_step: 1 does not come after the previous stage (1)"),
    ("train.skip_steps=['²']", "train.skip_steps: '²' is not a step N or a range A-B"),  # isdigit() takes it
    ("logging.profile_steps=1-²", "logging.profile_steps: '1-²' is not a step N or a range A-B"),
    ("parallel.collective_timeout_minutes=.inf", "parallel.collective_timeout_minutes: expected a finite number"),
    # int() of inf or nan raises its own errors; an infinite eps, norm eps or RoPE base trains without learning
    ("train.train_steps=.inf", "train.train_steps: expected a finite number, got inf"),
    ("parallel.tp=.nan", "parallel.tp: expected a finite number, got nan"),
    ("optimizer.eps=.inf", "optimizer.eps: expected a finite number, got inf"),
    ("model.rms_norm_eps=inf", "model.rms_norm_eps: expected a finite number, got inf"),  # a string
    # a string (YAML reads a float without a dot as one), which float() reads as 3e-4 and 1e-5
    ("optimizer.lr=\u0663e-4", "optimizer.lr: expected a number, got '\u0663e-4'"),
    ("model.rms_norm_eps=\uff11e-5", "model.rms_norm_eps: expected a number, got '\uff11e-5'"),
    ("model.rope_theta=.nan", "model.rope_theta: expected a finite number, got nan"),
    # an integer past a float's range: float() raised OverflowError, a traceback
    pytest.param("optimizer.lr=1" + "0" * 400,
                 "optimizer.lr: expected a finite number, got an integer beyond a float's range",
                 id="optimizer.lr=10^400"),
    ("lr_schedule.decay_steps=5", "lr_schedule.decay_steps: 5 without lr_schedule.decay_start_step"),
    # a decay's shape or floor without a decay trained at a constant learning rate without a word
    ("lr_schedule.decay_style=cosine", "lr_schedule.decay_style: cosine without lr_schedule.decay_start_step"),
    ("lr_schedule.min_lr=1e-4", "lr_schedule.min_lr: 0.0001 without lr_schedule.decay_start_step"),
    # past torch.manual_seed's range: an OverflowError traceback on every rank after the rendezvous
    ("train.train_steps=99999999999999", "train.train_steps: 99999999999999 steps of 8 samples are more than the "
                                         "sampler's 2^38 samples"),
    ("train.seed=99999999999999999999999", "train.seed: 99999999999999999999999 is not a 64-bit integer"),
    # a weight torch cannot size (its fp32 bytes past int64): an overflow traceback in build_model
    ("model.vocab_size=9223372036854775808", "model.vocab_size: 9223372036854775808 makes a weight of "
                                             "9223372036854775808 x 64 (hidden_size) elements, more than torch can"),
    ("model.intermediate_size=4611686018427387904", "model.intermediate_size: 4611686018427387904 makes a weight of"),
    ("model.hidden_size=1099511627776", "model.num_key_value_heads: 2 makes a weight of 2199023255552 x "
                                        "1099511627776 (hidden_size) elements"),
    ("checkpoint.dir=''", "checkpoint.dir: empty"),
    ("logging.dir=' '", "logging.dir: empty"),
    ("parallel.collective_timeout_minutes=1e12", "parallel.collective_timeout_minutes: must be > 0 and at most"),
    # config.json's initializer_range past 1, which transformers refuses: the run could never be exported
    ("model.init_std=1.5", "model.init_std: 1.5 is more than 1, which a Hugging Face export writes as config.json's "
                           "initializer_range, where transformers reads 0 to 1: set model.initializer_range"),
    ("model.initializer_range=1.01", "model.initializer_range: 1.01 is more than 1"),
    ("model.initializer_range=-0.01", "model.initializer_range: must not be negative"),
])
def test_validation_names_the_field(tiny_yaml, override, field):
    with pytest.raises(ConfigError) as e:
        load_config(tiny_yaml, [override])
    assert field in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("second", ["val/web.zarr", "val/web.ds", "./val/web", "val//web/", "other/../val/web.bin"])
def test_validation_stores_with_one_name_are_refused(tiny_yaml, second):
    """val_losses names each store by its dataset key (a store file's suffix, `./`, doubled slashes do not count):
    two paths with one key would be one entry, one store's loss lost (or one store scored twice)."""
    overrides = ["validation.interval=5", "validation.num_samples=4", "data.root=/corpus",
                 f"validation.data=[val/web,{second}]"]
    with pytest.raises(ConfigError) as e:
        load_config(tiny_yaml, overrides)
    assert str(e.value) == (f"validation.data: /corpus/val/web and /corpus/{second} have one name in val_losses, "
                            "val/web (a store file's suffix, ./ and doubled slashes do not count): name each store "
                            "once, and stores side by side by more than a suffix")
    assert load_config(tiny_yaml, overrides[:3] + ["validation.data=[val/web,val/web2]"]).validation.data == [
        "/corpus/val/web", "/corpus/val/web2"]


def test_an_init_std_past_1_trains_when_the_export_is_told_what_to_write(tiny_yaml):
    from nanotronix.convert.hf_mapping import hf_config_dict

    cfg = load_config(tiny_yaml, ["model.init_std=1.5", "model.initializer_range=0.02"])
    assert (cfg.model.init_std, hf_config_dict(cfg.model)["initializer_range"]) == (1.5, 0.02)
    # 0, which transformers reads (0 to 1) and an imported config.json may hold
    cfg = load_config(tiny_yaml, ["model.initializer_range=0.0"])
    assert hf_config_dict(cfg.model)["initializer_range"] == 0.0


def test_missing_model_field_is_reported(tiny_yaml):
    with pytest.raises(ConfigError, match="model.hidden_size, model.intermediate_size, .*, model.init_std: missing "
                                          "\\(set them or use model.preset"):
        load_config(None, [])  # every missing field at once, not one per attempt
    with pytest.raises(ConfigError, match="^model.rope_theta: missing \\(set it or"):
        load_config(tiny_yaml, ["model.rope_theta=null"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match=f"config file {empty} is empty"):
        load_config(empty)
    with pytest.raises(ConfigError, match=f"config file {tmp_path} is a folder"):
        load_config(tmp_path)


def test_a_config_path_the_os_cannot_look_up_is_one_line(tmp_path):
    """A name over 255 bytes (ENAMETOOLONG, from the OS's stat, not a missing file): a ConfigError, not the OSError
    that ended `python -m nanotronix.train --config NAME` in a traceback."""
    import errno
    import os

    long_name = tmp_path / ("n" * 300 + ".yaml")
    with pytest.raises(OSError) as raised:  # the reference: what the OS itself says of that path
        os.stat(long_name)
    assert raised.value.errno == errno.ENAMETOOLONG
    with pytest.raises(ConfigError, match=f"config file {long_name} cannot be read: File name too long"):
        load_config(long_name)


def test_layout_resolution(tiny_yaml):
    cfg = load_config(tiny_yaml, ["parallel.tp=2", "parallel.pp=2"])
    assert resolve_layout(cfg, 8) == 2 and grad_accum_steps(cfg, 2) == 2
    with pytest.raises(ConfigError, match="world size 6 is not divisible by tp\\*pp"):
        resolve_layout(cfg, 6)
    with pytest.raises(ConfigError, match=r"^parallel: tp\*pp = 2\*2 = 4 needs at least 4 processes, the job has 3$"):
        resolve_layout(cfg, 3)
    with pytest.raises(ConfigError, match="parallel.dp: 4 but world size 8"):
        resolve_layout(load_config(tiny_yaml, ["parallel.tp=2", "parallel.dp=4", "parallel.pp=2"]), 8)
    with pytest.raises(ConfigError, match="does not divide model.num_key_value_heads=2"):
        resolve_layout(load_config(tiny_yaml, ["parallel.tp=4"]), 4)
    with pytest.raises(ConfigError, match="4 layers cannot fill 8 pipeline stages"):
        resolve_layout(load_config(tiny_yaml, ["parallel.pp=8"]), 8)


def test_sequence_parallel_at_tp_1_is_a_note_not_an_error(tiny_yaml):
    """A recipe written for tp>1 may set it and be reused at tp=1, where it splits nothing: said; the run goes on."""
    said = [n for n in config_notes(load_config(tiny_yaml, ["parallel.sequence_parallel=true"]))
            if n.startswith("parallel.sequence_parallel")]
    assert said == ["parallel.sequence_parallel is set but parallel.tp is 1: it splits activations among the "
                    "tensor-parallel ranks, so with one it does nothing"]
    for overrides in (["parallel.sequence_parallel=true", "parallel.tp=2"], ["parallel.tp=2"], []):
        assert not [n for n in config_notes(load_config(tiny_yaml, overrides)) if "sequence_parallel" in n], overrides


def test_stage_weights_that_do_not_sum_to_1_are_a_note(tiny_yaml):
    """The weights are a stage's shares of its samples; ones that do not sum to 1 are scaled (the blend uses their
    ratios), which a typo in one share would do to every other: said in a note, naming the stage and the sum."""
    two = ["data.stages.0.datasets=[{path: x, weight: 0.54}, {path: y, weight: 0.46}]"]
    assert not [n for n in config_notes(load_config(tiny_yaml, two)) if "weights sum" in n]
    assert not [n for n in config_notes(load_config(tiny_yaml, ["data.stages.0.datasets.0.weight=0.3"]))
                if "weights sum" in n]  # one dataset: all of the stage, whatever its weight
    typo = ["data.stages.0.datasets=[{path: x, weight: 0.45}, {path: y, weight: 0.46}]"]
    assert [n for n in config_notes(load_config(tiny_yaml, typo)) if "weights sum" in n] == [
        "data.stages.0 (s1): its weights sum to 0.91, not 1: each dataset gets its weight / 0.91 of the stage's "
        "samples (only their ratios count)"]


def test_yaml_that_would_be_read_other_than_written_is_refused(tmp_path, tiny_yaml):
    """A key given twice (PyYAML keeps the last: a second `train:` section appended to a recipe put every train field
    back to its default), a file that is not UTF-8, and an override of a place that a YAML alias shares with its
    anchor (which changed both: the first stage's mixture along with the second's)."""
    twice = tmp_path / "twice.yaml"
    twice.write_text(tiny_yaml.read_text() + "train: {train_steps: 1000}\n")
    with pytest.raises(ConfigError, match=f"{twice}: line \\d+: key 'train' given twice in the same mapping"):
        load_config(twice)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(tiny_yaml.read_bytes() + b"# \xe9t\xe9\n")
    with pytest.raises(ConfigError, match=f"{latin1}: not UTF-8 text"):
        load_config(latin1)
    anchored = tmp_path / "anchored.yaml"
    tree = yaml.safe_dump({k: v for k, v in TINY.items() if k != "data"})
    anchored.write_text(tree + """data:
  stages:
    - {name: s1, start_step: 1, datasets: &mix [{path: x, weight: 1.0}, {path: y, weight: 1.0}]}
    - {name: s2, start_step: 2, datasets: *mix}
""")
    cfg = load_config(anchored, ["data.stages.1.datasets.0.weight=0.1"])
    assert [[d.weight for d in stage.datasets] for stage in cfg.data.stages] == [[1.0, 1.0], [0.1, 1.0]]


def test_yaml_values_pyyaml_cannot_build_are_one_line_errors(tmp_path, tiny_yaml):
    """PyYAML reads 2023-02-30 as a date and Python's int() refuses an integer of more than
    sys.get_int_max_str_digits() digits: both ended in a ValueError traceback. In a file: a one-line ConfigError naming
    the line; in an override: the text as written, as for a value that is not YAML (a string field takes it)."""
    with pytest.raises(ValueError, match="day is out of range"):
        datetime.date(2023, 2, 30)  # the reference: no such day
    long_number = "1" + "0" * sys.get_int_max_str_digits()
    for value, reason in (("2023-02-30", "day is out of range for month"),
                          (long_number, "Exceeds the limit .* for integer string conversion")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(tiny_yaml.read_text() + f"logging: {{dir: {value}}}\n")
        line = len(bad.read_text().splitlines())
        with pytest.raises(ConfigError, match=f"{bad}: line {line}: .* cannot be read as YAML \\({reason}"):
            load_config(bad)
        assert load_config(tiny_yaml, [f"logging.dir={value}"]).logging.dir == value
        with pytest.raises(ConfigError, match="train.seed: expected an integer"):
            load_config(tiny_yaml, [f"train.seed={value}"])


def test_yaml_merge_keys_are_read_as_yaml_says(tmp_path):
    """`<<: *anchor` merges the anchor's entries, which the mapping may then override (the duplicate-key check must
    not count merged entries, nor refuse the merge key itself); an unhashable key is a one-line error."""
    merged = tmp_path / "merged.yaml"
    tree = yaml.safe_dump({k: v for k, v in TINY.items() if k != "data"})
    merged.write_text(tree + """data:
  stages:
    - &first {name: s1, start_step: 1, datasets: [{path: x, weight: 1.0}]}
    - <<: *first
      name: s2
      start_step: 2
""")
    cfg = load_config(merged)
    assert [(s.name, s.start_step, s.datasets[0].path) for s in cfg.data.stages] == [("s1", 1, "x"), ("s2", 2, "x")]
    twice = tmp_path / "merged_twice.yaml"
    twice.write_text(merged.read_text() + "      name: s3\n")
    with pytest.raises(ConfigError, match="key 'name' given twice"):
        load_config(twice)
    unhashable = tmp_path / "unhashable.yaml"
    unhashable.write_text(tree + "? [1, 2]\n: 3\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(unhashable)


@pytest.mark.parametrize("override, said", [
    ("0\n0=", "override '0\\n0=': the key holds a control character"),  # a random seed of the property found it
    ("model.hidden_size.x\ny=1", "override 'model.hidden_size.x\\ny=1': the key holds a control character"),
    ("model.\tx=1", "override 'model.\\tx=1': the key holds a control character"),
])
def test_a_key_with_a_line_break_is_one_line(tiny_yaml, tmp_path, override, said):
    """A key typed with a line break was echoed as written, making a two-line error; so was a YAML file's."""
    with pytest.raises(ConfigError) as e:
        load_config(tiny_yaml, [override])
    assert str(e.value) == said
    config = tmp_path / "broken_key.yaml"
    config.write_text(Path(tiny_yaml).read_text() + '"log\\nging": {}\n')
    with pytest.raises(ConfigError) as e:
        load_config(config)
    assert str(e.value).startswith("'log\\nging': unknown config key (known: ")
