"""Typed configs from YAML: valid spaces load; every malformed one is rejected with file, line and field path."""

from __future__ import annotations

import sys
import textwrap
from dataclasses import asdict

import pytest
import torch
from optuna.trial import FixedTrial

from hybridnas import registry
from hybridnas.config import (
    ArchConfig,
    ModelConfig,
    Range,
    SearchSpace,
    TrainConfig,
    check_train,
    load_arch,
    load_space,
    parse_searchable,
    value_options,
)
from hybridnas.model import HybridLM
from hybridnas.search import sample_arch
from hybridnas.tasks import MQARConfig
from hybridnas.yamlio import ConfigError, Source, dump_yaml, load_text


def y(text: str) -> str:
    """Dedented YAML whose first line is line 1 (the line numbers in the tables below count from there)."""
    return textwrap.dedent(text).lstrip("\n")


TASK = "task: {name: mqar, vocab_size: 64, seq_len: 32, num_kv_pairs: 4}\n"  # always line 1 when used

VALID_SPACE = y("""
    name: demo
    task:
      name: mqar
      vocab_size: 64
      seq_len: 32
      num_kv_pairs: 4
    model:
      d_model: [32, 64]
      pattern: ["AA", "A-A-", "(AE)x2"]
      layers:
        A:
          n_heads: [2, 4]
        E:
          n_experts: [2, 4]
    train:
      lr: {low: 1e-3, high: 1e-2, log: true}
      steps: 20
      batch_size: {low: 2, high: 8}
""")

VALID_ARCH = y("""
    name: tiny
    task: {name: mqar, vocab_size: 64, seq_len: 32, num_kv_pairs: 4, num_train: 16, num_test: 8}
    model:
      d_model: 32
      pattern: "(AF)x2"
      layers:
        A: {n_heads: 4, n_kv_heads: 2}
        F: {expand: 2.0}
    train:
      steps: 5
      lr: 3e-3
      batch_size: 4
      device: cpu
""")


# ---------------------------------------------------------------------------------------------- valid files


def test_valid_space_loads_with_typed_values():
    space = load_space(text=VALID_SPACE, file="space.yaml")
    assert isinstance(space, SearchSpace)
    assert space.name == "demo"
    assert space.source.file == "space.yaml"
    assert space.text == VALID_SPACE

    assert space.task.name == "mqar"
    assert space.task.params["vocab_size"] == 64 and space.task.params["seq_len"] == 32
    assert space.task.params["num_kv_pairs"] == 4
    assert isinstance(space.task.build_config(), MQARConfig)

    m = space.model
    assert m["d_model"] == [32, 64] and all(type(d) is int for d in m["d_model"])
    assert m["pattern"] == ["AA", "A-A-", "(AE)x2"]
    assert space.patterns() == ["AA", "A-A-", "(AE)x2"]
    assert m["layers"] == {"A": {"n_heads": [2, 4]}, "E": {"n_experts": [2, 4]}}
    assert m["vocab_size"] == 64  # defaults to the task's vocabulary

    lr = space.train["lr"]
    assert isinstance(lr, Range)
    assert lr.log is True and lr.step is None
    assert type(lr.low) is float and type(lr.high) is float  # YAML 1.1 reads "1e-3" as a string: converted
    assert lr.low == pytest.approx(1e-3) and lr.high == pytest.approx(1e-2)
    bs = space.train["batch_size"]
    assert isinstance(bs, Range) and (bs.low, bs.high) == (2, 8)
    assert type(bs.low) is int and type(bs.high) is int  # an int field keeps an int range
    assert space.train["steps"] == 20 and type(space.train["steps"]) is int

    assert space.search.sampler == "tpe" and space.search.pruner == "median"  # the defaults replay chose
    assert space.search.lr_mode == "halving" and space.search.prune_after == 0.5 and space.search.confirm_top == 3
    assert space.export.dir is None
    assert space.symbols == {}


def test_valid_space_from_a_file_takes_its_name_from_the_file(tmp_path):
    path = tmp_path / "my_space.yaml"
    path.write_text(VALID_SPACE.replace("name: demo\n", ""), encoding="utf-8")
    space = load_space(str(path))
    assert space.name == "my_space"
    assert space.source.file == str(path)
    assert space.model["d_model"] == [32, 64]


def test_a_space_may_be_fully_concrete():
    space = load_space(text=TASK + "model: {d_model: 32, pattern: AF}\ntrain: {steps: 3}\n", file="one.yaml")
    assert space.patterns() == ["AF"]
    assert space.model["d_model"] == 32
    assert space.train == {"steps": 3}


def test_space_sample_is_a_buildable_model():
    space = load_space(text=VALID_SPACE, file="space.yaml")
    trial = FixedTrial({"pattern": "(AE)x2", "d_model": 32, "A.n_heads": 4, "E.n_experts": 2, "lr": 5e-3,
                        "batch_size": 4})
    arch = sample_arch(space, trial)
    assert arch.model.pattern == "(AE)x2" and arch.model.d_model == 32
    assert arch.model.layers == {"A": {"n_heads": 4}, "E": {"n_experts": 2}}
    assert arch.train.steps == 20 and arch.train.batch_size == 4
    model = HybridLM(arch.model)
    assert model.num_params() == HybridLM.param_count(arch.model)


def test_load_arch_concrete_file(tmp_path):
    path = tmp_path / "arch.yaml"
    path.write_text(VALID_ARCH, encoding="utf-8")
    arch = load_arch(str(path))
    assert isinstance(arch, ArchConfig)
    assert arch.name == "tiny"
    assert isinstance(arch.model, ModelConfig) and isinstance(arch.train, TrainConfig)
    assert arch.model.d_model == 32 and arch.model.pattern == "(AF)x2" and arch.model.vocab_size == 64
    assert arch.model.layers == {"A": {"n_heads": 4, "n_kv_heads": 2}, "F": {"expand": 2.0}}
    assert arch.train.steps == 5 and arch.train.batch_size == 4 and arch.train.device == "cpu"
    assert arch.train.lr == pytest.approx(3e-3) and type(arch.train.lr) is float
    task = arch.task.build_config()
    assert isinstance(task, MQARConfig) and task.num_train == 16
    assert HybridLM(arch.model).num_params() == HybridLM.param_count(arch.model)


def test_load_arch_round_trips_through_to_dict():
    arch = load_arch(text=VALID_ARCH, file="arch.yaml")
    again = load_arch(text=dump_yaml(arch.to_dict()), file="again.yaml")
    assert again.to_dict() == arch.to_dict()
    assert load_arch(data=arch.to_dict()).to_dict() == arch.to_dict()


def test_load_arch_rejects_choices():
    text = TASK + "model:\n  d_model: [32, 64]\n"
    with pytest.raises(ConfigError) as info:
        load_arch(text=text, file="arch.yaml")
    e = info.value
    assert (e.file, e.line, e.path) == ("arch.yaml", 3, ("model", "d_model"))
    assert "expected an integer" in e.message


def test_error_text_is_file_line_path_message():
    with pytest.raises(ConfigError) as info:
        load_space(text=TASK + "model:\n  d_modle: 32\n", file="space.yaml")
    assert str(info.value).startswith("space.yaml:3: model.d_modle: unknown key 'd_modle' (did you mean 'd_model'?)")


# ---------------------------------------------------------------------------------------------- malformed files

# (id, yaml, line, path, substring of the message). Line numbers count from the first line of the YAML string.
MALFORMED = [
    ("yaml-syntax-unclosed-list", y("""
        model:
          d_model: 32
          pattern: [AA, AF
        train:
          steps: 3
     """), 4, None, "invalid YAML"),
    ("yaml-syntax-bad-indent", y("""
        model:
          d_model: 32
         pattern: AA
     """), 3, None, "invalid YAML"),
    ("yaml-tab-indent", "model:\n\td_model: 32\n", 2, None, "invalid YAML"),
    ("empty-file", "", 1, (), "the file is empty"),
    ("only-comments", "# nothing here\n\n", 1, (), "the file is empty"),
    ("top-level-list", "- model\n- train\n", 1, (), "expected a mapping with keys"),
    ("top-level-scalar", "hello\n", 1, (), "expected a mapping"),
    ("unknown-top-key-modle", TASK + y("""
        modle:
          d_model: 32
     """), 2, ("modle",), "did you mean 'model'"),
    ("unknown-model-key-d_modle", TASK + y("""
        model:
          pattern: AA
          d_modle: 32
     """), 4, ("model", "d_modle"), "did you mean 'd_model'"),
    ("unknown-train-key-lrr", TASK + y("""
        train:
          steps: 10
          lrr: 0.001
     """), 4, ("train", "lrr"), "did you mean 'lr'"),
    ("unknown-train-key-learning_rate", TASK + y("""
        train:
          learning_rate: 0.001
     """), 3, ("train", "learning_rate"), "unknown key 'learning_rate'; known keys: steps, batch_size, lr"),
    ("unknown-layer-param-n_head", TASK + y("""
        model:
          d_model: 32
          layers:
            A:
              n_kv_heads: 2
              n_head: 4
     """), 7, ("model", "layers", "A", "n_head"), "did you mean 'n_heads'"),
    ("unknown-layer-symbol-Q", TASK + y("""
        model:
          d_model: 32
          layers:
            A: {n_heads: 4}
            Q: {n_heads: 4}
     """), 6, ("model", "layers", "Q"), "unknown layer symbol 'Q'"),
    ("pattern-bad-symbol", TASK + y("""
        model:
          pattern:
            - AA
            - AF
            - AQ
     """), 6, ("model", "pattern", 2), "registered symbols: "),
    ("pattern-unbalanced-paren", TASK + y("""
        model:
          d_model: 32
          pattern: "A(AF"
     """), 4, ("model", "pattern"), "unbalanced '('"),
    ("pattern-not-a-string", TASK + "model:\n  pattern: [AA, 7]\n", 3, ("model", "pattern", 1),
     "a pattern must be a string"),
    ("empty-pattern-list", TASK + "model:\n  pattern: []\n", 3, ("model", "pattern"), "empty list of patterns"),
    ("wrong-type-d_model-string", TASK + y("""
        model:
          pattern: AA
          d_model: "big"
     """), 4, ("model", "d_model"), "expected an integer, got 'big'"),
    ("bool-where-int-wanted", TASK + y("""
        train:
          lr: 0.01
          steps: true
     """), 4, ("train", "steps"), "expected an integer, got True"),
    ("wrong-type-in-choice-list", TASK + y("""
        model:
          d_model:
            - 32
            - sixty-four
     """), 5, ("model", "d_model", 1), "expected an integer, got 'sixty-four'"),
    ("range-low-above-high", TASK + y("""
        model:
          d_model: 32
          layers:
            A:
              n_heads: {low: 8, high: 2}
     """), 6, ("model", "layers", "A", "n_heads"), "low (8) is greater than high (2)"),
    ("log-range-low-not-positive", TASK + y("""
        train:
          lr:
            low: 0
            high: 0.1
            log: true
     """), 4, ("train", "lr", "low"), "a log range needs low > 0"),
    ("range-on-string-field", TASK + y("""
        train:
          device: {low: 0, high: 1}
     """), 3, ("train", "device"), "range needs a numeric field, this one is str"),
    ("range-on-bool-field", TASK + y("""
        model:
          tie_embeddings: {low: 0, high: 1}
     """), 3, ("model", "tie_embeddings"), "range needs a numeric field, this one is bool"),
    ("range-float-bound-on-int-field", TASK + y("""
        model:
          d_model: 32
          layers:
            E:
              n_experts:
                low: 1.5
                high: 8
     """), 7, ("model", "layers", "E", "n_experts", "low"), "this field takes integers, got 1.5"),
    ("range-float-step-on-int-field", TASK + y("""
        train:
          steps: {low: 10, high: 20, step: 2.5}
     """), 3, ("train", "steps", "step"), "this field takes integers, got 2.5"),
    ("range-infinite-bound", TASK + y("""
        train:
          steps:
            low: 1
            high: .inf
     """), 5, ("train", "steps", "high"), "must be a finite number"),
    ("range-missing-high", TASK + "train:\n  steps: {low: 10}\n", 3, ("train", "steps"),
     "missing required key 'high'"),
    ("range-unknown-key-lg", TASK + y("""
        train:
          lr:
            low: 0.001
            high: 0.1
            lg: true
     """), 6, ("train", "lr", "lg"), "did you mean 'log'"),
    ("range-log-and-step", TASK + "train:\n  batch_size: {low: 2, high: 16, log: true, step: 2}\n", 3,
     ("train", "batch_size"), "both log and step"),
    ("empty-choice-list", TASK + y("""
        model:
          d_model: 32
          layers:
            E:
              n_experts: []
     """), 6, ("model", "layers", "E", "n_experts"), "an empty list of choices"),
    ("duplicate-choices", TASK + y("""
        model:
          d_model: [32, 64, 32]
     """), 3, ("model", "d_model"), "duplicate choices"),
    ("duplicate-yaml-key-top", TASK + y("""
        model:
          d_model: 32
        train:
          steps: 5
        model:
          d_model: 64
     """), 6, ("model",), "duplicate key 'model' (first given on line 2)"),
    ("duplicate-yaml-key-nested", TASK + y("""
        model:
          d_model: 32
          layers:
            A:
              n_heads: 4
              window: 8
              n_heads: 2
     """), 8, ("model", "layers", "A", "n_heads"), "duplicate key 'n_heads' (first given on line 6)"),
    ("d_model-not-divisible-by-n_heads", TASK + y("""
        model:
          d_model: [32, 48]
          pattern: AA
          layers:
            A:
              n_heads: [4, 5]
     """), 7, ("model", "layers", "A", "n_heads"), "d_model=32 is not divisible by n_heads=5"),
    ("n_heads-not-divisible-by-n_kv_heads", TASK + y("""
        model:
          d_model: 48
          layers:
            A:
              n_heads: 6
              n_kv_heads: 4
     """), 7, ("model", "layers", "A", "n_kv_heads"), "n_heads=6 is not divisible by n_kv_heads=4"),
    ("moe-top_k-above-n_experts", TASK + y("""
        model:
          d_model: 32
          pattern: AE
          layers:
            E:
              n_experts: [2, 4]
              top_k: 3
     """), 8, ("model", "layers", "E", "top_k"), "top_k must be in [1, n_experts=2], got 3"),
    ("alias-symbol-error-on-its-line", TASK + y("""
        model:
          d_model: 32
          layers:
            A: {n_heads: 4}
            "*":
              n_kv_heads: 3
     """), 7, ("model", "layers", "A", "n_kv_heads"), "n_heads=4 is not divisible by n_kv_heads=3"),
    ("unknown-task-mqr", y("""
        model: {d_model: 32}
        task:
          name: mqr
          seq_len: 32
     """), 3, ("task", "name"), "unknown task 'mqr' (did you mean 'mqar'?)"),
    ("task-not-a-mapping", "task: mqar\n", 1, ("task",), "expected a mapping"),
    ("task-seq_len-odd", y("""
        task:
          name: mqar
          vocab_size: 64
          seq_len: 33
          num_kv_pairs: 4
     """), 4, ("task", "seq_len"), "must be even, got 33"),
    ("task-num_kv_pairs-too-large", y("""
        task:
          name: mqar
          vocab_size: 64
          seq_len: 32
          num_kv_pairs: 9
     """), 5, ("task", "num_kv_pairs"), "at most 8, got 9"),
    ("task-unknown-field", y("""
        task:
          name: mqar
          seqlen: 32
     """), 3, ("task", "seqlen"), "did you mean 'seq_len'"),
    ("task-wrong-type", "task: {name: mqar, seq_len: 3.5}\n", 1, ("task", "seq_len"), "expected an integer"),
    ("unknown-sampler-tpee", TASK + y("""
        search:
          n_trials: 4
          sampler: tpee
     """), 4, ("search", "sampler"), "did you mean 'tpe'"),
    ("unknown-pruner", TASK + y("""
        search:
          pruner: hyperbnad
     """), 3, ("search", "pruner"), "did you mean 'hyperband'"),
    ("unknown-search-key", TASK + "search:\n  n_trial: 4\n", 3, ("search", "n_trial"), "did you mean 'n_trials'"),
    ("search-n_trials-zero", TASK + "search:\n  n_trials: 0\n", 3, ("search", "n_trials"), "must be positive"),
    ("train-negative-steps", TASK + y("""
        train:
          lr: 0.001
          steps: -5
     """), 4, ("train", "steps"), "must be positive, got -5"),
    ("train-lr-zero", TASK + y("""
        train:
          lr: 0
     """), 3, ("train", "lr"), "must be positive, got 0"),
    ("train-lr-choice-negative", TASK + "train:\n  lr: [0.01, -0.01]\n", 3, ("train", "lr"), "must be positive"),
    ("train-beta-out-of-range", TASK + "train:\n  beta2: 1.5\n", 3, ("train", "beta2"), "must be in [0, 1]"),
    ("model-vocab-smaller-than-task", TASK + y("""
        model:
          d_model: 32
          vocab_size: 32
     """), 4, ("model", "vocab_size"), "vocab_size 32 is smaller than the task's vocabulary (64)"),
    ("model-d_model-not-positive", TASK + "model:\n  d_model: [0, 32]\n", 3, ("model", "d_model"),
     "must be positive, got 0"),
    ("symbols-import-path-missing-module", y("""
        symbols:
          Z: hybridnas_no_such_module.layers:Mixer
        model:
          pattern: AZ
     """), 2, ("symbols", "Z"), "cannot import module 'hybridnas_no_such_module.layers'"),
    ("symbols-import-path-missing-class", y("""
        symbols:
          Z: layers.attention:NoSuchMixer
     """), 2, ("symbols", "Z"), "has no attribute 'NoSuchMixer'"),
    ("symbols-not-a-layer", "symbols:\n  Z: collections:OrderedDict\n", 2, ("symbols", "Z"),
     "is not a subclass of layers.base.Layer"),
    ("symbols-bad-character", "symbols:\n  ZZ: layers.attention:Attention\n", 2, ("symbols", "ZZ"),
     "must be one character"),
    ("name-not-a-string", "name: [a, b]\n", 1, ("name",), "expected a string"),
]


@pytest.mark.parametrize(("text", "line", "path", "message"),
                         [pytest.param(*case[1:], id=case[0]) for case in MALFORMED])
def test_malformed_space_is_rejected_with_file_line_and_path(text, line, path, message):
    before = set(registry.symbol_map())
    try:
        with pytest.raises(ConfigError) as info:
            load_space(text=text, file="bad.yaml")
    finally:
        for sym in set(registry.symbol_map()) - before:  # a failed load must not leave symbols behind for others
            registry.unregister(sym)
    e = info.value
    assert e.file == "bad.yaml"
    assert e.line == line, str(e)
    assert e.path == path, str(e)
    assert message in e.message, str(e)
    assert str(e).startswith(f"bad.yaml:{line}:")


def test_enough_malformed_cases():
    assert len(MALFORMED) >= 20
    assert len({case[0] for case in MALFORMED}) == len(MALFORMED)


def test_missing_file_names_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_space(str(missing))
    assert info.value.file == str(missing)
    assert "file not found" in info.value.message


# ---------------------------------------------------------------------------------------------- user layers by path

SYMBOL = "Z"

USER_LAYER_SOURCE = '''
from dataclasses import dataclass

import torch
from torch import nn

from layers.base import LayerConfigError, TokenwiseLayer


class ScaledLinear(TokenwiseLayer):
    """y = scale * W x, position by position (no decoding state). Parameters: d*d (+ d with bias)."""

    kind = "mixer"

    @dataclass
    class Config:
        scale: float = 1.0
        bias: bool = False

    def __init__(self, d_model, config=None, *, layer_idx=0, n_layers=1):
        super().__init__(d_model, config, layer_idx=layer_idx, n_layers=n_layers)
        self.proj = nn.Linear(d_model, d_model, bias=self.config.bias)
        self.reset_parameters()

    @classmethod
    def check_config(cls, d_model, config):
        super().check_config(d_model, config)
        if not config.scale > 0:
            raise LayerConfigError("scale", f"scale must be positive, got {config.scale}")

    @classmethod
    def param_count(cls, d_model, config):
        return d_model * d_model + (d_model if config.bias else 0)

    def reset_parameters(self):
        nn.init.normal_(self.proj.weight, std=0.02)
        if self.proj.bias is not None:
            nn.init.zeros_(self.proj.bias)

    def forward(self, x, ctx=None):
        return self.config.scale * self.proj(x)
'''


@pytest.fixture
def user_layer(tmp_path, monkeypatch):
    """A module on sys.path defining a Layer subclass; the symbol it gets is unregistered afterwards."""
    module = "hybridnas_test_user_layer"
    (tmp_path / f"{module}.py").write_text(USER_LAYER_SOURCE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert SYMBOL not in registry.symbol_map(), f"symbol {SYMBOL!r} is already registered"
    yield f"{module}:ScaledLinear"
    registry.unregister(SYMBOL)
    sys.modules.pop(module, None)


def user_space(import_path: str, layer_params: str = "{scale: {low: 0.5, high: 2.0}, bias: [false, true]}") -> str:
    return y(f"""
        symbols:
          {SYMBOL}: {import_path}
        task: {{name: mqar, vocab_size: 64, seq_len: 32, num_kv_pairs: 4}}
        model:
          d_model: 32
          pattern: [A{SYMBOL}, "({SYMBOL}A)x2"]
          layers:
            {SYMBOL}: {layer_params}
        train:
          steps: 5
    """)


def test_symbol_registered_from_yaml_is_usable(user_layer):
    space = load_space(text=user_space(user_layer), file="user.yaml")
    assert space.symbols == {SYMBOL: user_layer}
    assert registry.get(SYMBOL).cls.__name__ == "ScaledLinear"
    assert space.patterns() == [f"A{SYMBOL}", f"({SYMBOL}A)x2"]
    scale = space.model["layers"][SYMBOL]["scale"]
    assert isinstance(scale, Range) and (scale.low, scale.high) == (0.5, 2.0)
    assert space.model["layers"][SYMBOL]["bias"] == [False, True]

    # loading the same space again is fine: the symbol already points at the same class
    load_space(text=user_space(user_layer), file="user.yaml")

    trial = FixedTrial({"pattern": f"A{SYMBOL}", f"{SYMBOL}.scale": 1.5, f"{SYMBOL}.bias": True})
    arch = sample_arch(space, trial)
    assert arch.model.pattern == f"A{SYMBOL}"
    assert arch.model.layers == {SYMBOL: {"scale": 1.5, "bias": True}}
    model = HybridLM(arch.model)
    cls = registry.get(SYMBOL).cls
    assert [type(b.layer).__name__ for b in model.blocks] == ["Attention", "ScaledLinear"]
    assert isinstance(model.blocks[1].layer, cls)
    assert model.blocks[1].layer.config.scale == 1.5
    assert model.num_params() == HybridLM.param_count(arch.model)
    logits = model(torch.randint(0, 64, (2, 8)))
    assert logits.shape == (2, 8, 64)


def test_symbol_registered_from_arch_file(user_layer):
    text = y(f"""
        symbols: {{{SYMBOL}: "{user_layer}"}}
        task: {{name: mqar, vocab_size: 64, seq_len: 32, num_kv_pairs: 4}}
        model: {{d_model: 32, pattern: "{SYMBOL}A{SYMBOL}", layers: {{{SYMBOL}: {{scale: 0.5}}}}}}
    """)
    arch = load_arch(text=text, file="arch.yaml", trust_custom_code=True)  # (tests/test_trust.py: refused without)
    model = HybridLM(arch.model)
    assert sum(isinstance(b.layer, registry.get(SYMBOL).cls) for b in model.blocks) == 2
    assert arch.to_dict()["symbols"] == {SYMBOL: user_layer}


def test_user_layer_parameters_are_checked(user_layer):
    with pytest.raises(ConfigError) as info:
        load_space(text=user_space(user_layer, "{scal: 1.0}"), file="user.yaml")
    assert info.value.path == ("model", "layers", SYMBOL, "scal")
    assert info.value.line == 8
    assert "did you mean 'scale'" in info.value.message

    with pytest.raises(ConfigError) as info:
        load_space(text=user_space(user_layer, "{scale: [1.0, 0.0]}"), file="user.yaml")
    assert info.value.path == ("model", "layers", SYMBOL, "scale")
    assert info.value.line == 8
    assert "scale must be positive" in info.value.message


def test_pattern_with_unregistered_symbol_is_rejected(user_layer):
    text = user_space(user_layer).split("task:", 1)[1]
    with pytest.raises(ConfigError) as info:
        load_space(text="task:" + text, file="user.yaml")
    # without the symbols entry, Z is unknown: the first place it is used is the pattern list
    assert info.value.path == ("model", "pattern", 0)
    assert f"unknown layer symbol {SYMBOL!r}" in info.value.message
    assert SYMBOL not in registry.symbol_map()


# ---------------------------------------------------------------------------------------------- check_train


def test_check_train_default_is_clean():
    assert check_train(TrainConfig()) == []
    assert check_train(TrainConfig(device="cuda:1", target_accuracy=None, eval_examples=None)) == []
    assert check_train(TrainConfig(weight_decay=0.0, warmup_steps=0, grad_clip=0.0, beta1=0.0, beta2=1.0)) == []


@pytest.mark.parametrize(("field", "value", "message"), [
    ("steps", 0, "must be positive"),
    ("steps", -3, "must be positive"),
    ("batch_size", 0, "must be positive"),
    ("lr", 0.0, "must be positive"),
    ("lr", -1e-3, "must be positive"),
    ("eval_every", 0, "must be positive"),
    ("weight_decay", -0.1, "must be >= 0"),
    ("warmup_steps", -1, "must be >= 0"),
    ("grad_clip", -1.0, "must be >= 0"),
    ("beta1", 1.5, "must be in [0, 1]"),
    ("beta2", -0.01, "must be in [0, 1]"),
    ("min_lr_ratio", 2.0, "must be in [0, 1]"),
    ("target_accuracy", 0.0, "must be in (0, 1]"),
    ("target_accuracy", 1.2, "must be in (0, 1]"),
    ("eval_examples", 0, "must be positive"),
    ("device", "gpu", "must be auto, cpu, cuda or cuda:N"),
])
def test_check_train_names_the_bad_field(field, value, message):
    problems = check_train(TrainConfig(**{field: value}))
    assert len(problems) == 1
    name, msg = problems[0]
    assert name == field
    assert message in msg


def test_check_train_reports_every_problem():
    problems = dict(check_train(TrainConfig(steps=0, lr=-1.0, beta1=2.0, device="tpu")))
    assert set(problems) == {"steps", "lr", "beta1", "device"}


# ---------------------------------------------------------------------------------------------- ranges


def _searchable(yaml_value: str, tp):
    data, src = load_text(f"x: {yaml_value}\n", "r.yaml")
    return parse_searchable(data["x"], tp, ("x",), src)


@pytest.mark.parametrize(("yaml_value", "tp", "low", "high", "kind"), [
    ("{low: 2, high: 8}", int, 2, 8, int),
    ("{low: 2.0, high: 8.0}", int, 2, 8, int),  # integral floats are fine on an int field
    ("{low: 2, high: 8}", int | None, 2, 8, int),
    ("{low: 2, high: 8}", float, 2.0, 8.0, float),
    ("{low: 1e-4, high: 1e-1, log: true}", float, 1e-4, 1e-1, float),  # YAML 1.1 strings, read as numbers
    ("{low: 0.5, high: 2.5}", float | None, 0.5, 2.5, float),
    ("{low: 3, high: 3}", int, 3, 3, int),
])
def test_range_keeps_the_field_type(yaml_value, tp, low, high, kind):
    r = _searchable(yaml_value, tp)
    assert isinstance(r, Range)
    assert type(r.low) is kind and type(r.high) is kind
    assert r.low == pytest.approx(low) and r.high == pytest.approx(high)


def test_int_range_step_stays_int():
    r = _searchable("{low: 8, high: 64, step: 8}", int)
    assert (r.low, r.high, r.step) == (8, 64, 8) and type(r.step) is int
    assert value_options(r) == [8, 16, 24, 32, 40, 48, 56, 64]


@pytest.mark.parametrize(("yaml_value", "tp", "path", "message"), [
    ("{low: 1.5, high: 8}", int, ("x", "low"), "this field takes integers, got 1.5"),
    ("{low: 1, high: 8.5}", int, ("x", "high"), "this field takes integers, got 8.5"),
    ("{low: 9, high: 8}", int, ("x",), "greater than high"),
    ("{low: -1, high: 1, log: true}", float, ("x", "low"), "log range needs low > 0"),
    ("{low: a, high: 1}", float, ("x", "low"), "expected a number"),
    ("{low: .nan, high: 1}", float, ("x", "low"), "must be a finite number"),
    ("{low: 1, high: 2}", str, ("x",), "needs a numeric field"),
])
def test_bad_ranges(yaml_value, tp, path, message):
    with pytest.raises(ConfigError) as info:
        _searchable(yaml_value, tp)
    assert info.value.path == path and info.value.line == 1 and info.value.file == "r.yaml"
    assert message in info.value.message


def test_choices_and_fixed_values_are_typed():
    assert _searchable("[1, 2.5]", float) == [1.0, 2.5]
    assert all(type(v) is float for v in _searchable("[1, 2]", float))
    assert _searchable("7", int) == 7
    assert _searchable("null", int | None) is None
    assert _searchable("[null, 4]", int | None) == [None, 4]


def test_value_options():
    assert value_options(Range(2, 5)) == [2, 3, 4, 5]
    assert value_options(Range(1e-4, 1e-2, log=True)) == [1e-4, 1e-2]
    assert value_options([3, 4]) == [3, 4]
    assert value_options(7) == [7]


def test_source_line_falls_back_to_the_parent():
    _, src = load_text(y("""
        model:
          layers:
            A: {n_heads: 4}
    """), "s.yaml")
    assert isinstance(src, Source)
    assert src.line(("model", "layers", "A", "n_heads")) == 3
    assert src.line(("model", "layers", "A", "window")) == 3  # not written: the nearest written parent
    assert src.line(("model", "d_model")) == 1


def test_arch_dataclasses_serialise():
    arch = load_arch(text=VALID_ARCH, file="arch.yaml")
    assert asdict(arch.model)["layers"]["A"] == {"n_heads": 4, "n_kv_heads": 2}
