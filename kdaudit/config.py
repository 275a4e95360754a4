"""Typed experiment configs, loaded strictly from YAML and `--set key=value` overrides.

Every section is a frozen dataclass. Unknown keys and values of the wrong type are errors
that name the key and what is allowed. The `data` and `model` sections are typed by the
registry entry their `name` selects, so each dataset and architecture owns its settings.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdaudit.conditions import DEFAULT_GRID
from kdaudit.errors import ConfigError
from kdaudit.metrics import functional_metrics


def _check_choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(allowed)}")


def _check_positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{key}: must be > 0, got {value}")


@dataclass(frozen=True)
class TrainConfig:
    optimizer: str = "adam"  # adam | adamw | sgd
    lr: float = 1e-3
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | cosine (over all steps)
    batch_size: int = 128
    epochs: int = 30
    max_steps: int | None = None  # cap on optimizer steps (used by --smoke)
    eval_batch_size: int = 4096
    augment: str = "none"  # none | crop_flip | randaugment (image datasets)
    # train accuracy/loss from at most this many examples (positions, for text); None: all
    eval_train_limit: int | None = None
    # CUDA speed-ups (no effect on the CPU; the record says what applied): bf16 autocast of
    # the forward pass (loss and metrics from fp32 logits), NHWC layout for 2D convnets,
    # torch.compile once per architecture per process.
    precision: str = "fp32"  # fp32 | bf16
    channels_last: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        _check_choice("train.optimizer", self.optimizer, ("adam", "adamw", "sgd"))
        _check_choice("train.precision", self.precision, ("fp32", "bf16"))
        _check_choice("train.augment", self.augment, ("none", "crop_flip", "randaugment"))
        _check_choice("train.schedule", self.schedule, ("constant", "cosine"))
        _check_positive("train.lr", self.lr)
        _check_positive("train.batch_size", self.batch_size)
        _check_positive("train.epochs", self.epochs)
        _check_positive("train.eval_batch_size", self.eval_batch_size)
        for key in ("max_steps", "eval_train_limit"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"train.{key}: must be > 0, got {value}; leave it out "
                                  "(null) for no limit")  # fmt: skip
        for key in ("momentum", "weight_decay"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}: must be >= 0, got {getattr(self, key)}")


@dataclass(frozen=True)
class ProtocolConfig:
    teacher_seeds: tuple[int, ...] = (0, 1, 2)
    student_seeds: tuple[int, ...] = tuple(range(10, 20))
    # registered names, or your own KD loss: {factory: "package.module:function", name: NAME}
    conditions: tuple[Any, ...] = DEFAULT_GRID
    alphas: tuple[float, ...] = (0.1, 0.5, 0.9)
    temperatures: tuple[float, ...] = (1.0,)
    # None: self-distillation (students share the teacher's architecture and initial weights).
    student_model: Any = field(default=None, metadata={"registry": "model", "optional": True})
    # Capacity scaling: student widths as fractions of the teacher's (a grid axis; empty: off).
    student_widths: tuple[float, ...] = ()
    # Data the teachers train on when it differs from the students' (`data`), e.g. a planted
    # error (tinyshakespeare_tha); None: the same data.
    teacher_data: Any = field(default=None, metadata={"registry": "data", "optional": True})
    # The teachers' training when it differs from the students' (`train`), e.g. a RandAugment
    # teacher (the teacher-regime experiment). In a config file only the keys that differ are
    # given; the rest come from `train` (see load_config). None: the same training.
    teacher_train: TrainConfig | None = None
    # A pretrained teacher: a state_dict file (.safetensors, .pt, .pth) loaded into the model
    # that `model` builds, instead of training one. Its initial weights are unknown, so the
    # students start from their own initialisation per student seed (PROTOCOL section 3).
    teacher_checkpoint: str | None = None
    # sha256 of that file: filled in by `kdaudit run` and saved in experiment.yaml (the run
    # ids depend on it, not on the path); set it to refuse any other file.
    teacher_sha256: str | None = None
    # Feature-map conditions (fmkd, fmrc): the student modules whose outputs are matched
    # (names from model.named_modules(), e.g. blocks.4), and the teacher's module for each
    # where its names differ (empty: the same names).
    feature_modules: tuple[str, ...] = ()
    teacher_feature_modules: tuple[str, ...] = ()
    # Teacher-error sweep: fractions of the teachers' training labels replaced at random, one
    # teacher per rate and teacher seed, each with its own paired students (who always see
    # clean labels). 0.0 is the clean teacher (kdaudit.engine.teachers.noisy_labels).
    teacher_label_noise: tuple[float, ...] = (0.0,)

    def __post_init__(self) -> None:
        from kdaudit.conditions import loss_condition, parse_entry

        entries = tuple(parse_entry(c) for c in self.conditions)
        object.__setattr__(self, "conditions", entries)  # mappings as typed entries
        for entry in entries:
            if not isinstance(entry, str):  # your own loss joins the condition registry
                loss_condition(entry)
        for key in ("teacher_seeds", "student_seeds"):
            seeds = list(getattr(self, key))
            if not seeds:
                raise ConfigError(f"protocol.{key}: empty; give at least one seed, e.g. "
                                  f"{key}: [{0 if key == 'teacher_seeds' else 10}]")  # fmt: skip
            twice = sorted({s for s in seeds if seeds.count(s) > 1})
            if twice:
                raise ConfigError(f"protocol.{key}: seeds {twice} are listed twice; each "
                                  "seed is one paired run per condition")  # fmt: skip
        names = self.condition_names
        if len(set(names)) != len(names):
            raise ConfigError(f"protocol.conditions: a condition is listed twice: {list(names)}")
        self._check_features()
        if "teacher" in names:
            raise ConfigError("protocol.conditions: 'teacher' runs are implied; list students only")
        for a in self.alphas:
            if not 0.0 <= a <= 1.0:
                raise ConfigError(f"protocol.alphas: {a} is outside [0, 1]")
        for t in self.temperatures:
            _check_positive("protocol.temperatures", t)
        for w in self.student_widths:
            if not 0.0 < w <= 1.0:
                raise ConfigError(f"protocol.student_widths: {w} is outside (0, 1]")
        if len(set(self.student_widths)) != len(self.student_widths):
            raise ConfigError("protocol.student_widths: a width is listed twice")
        self._check_label_noise()
        overlap = set(self.teacher_seeds) & set(self.student_seeds)
        if overlap:
            raise ConfigError(
                f"protocol: seeds {sorted(overlap)} are both teacher and student seeds; "
                "a student would share its teacher's data order"
            )
        if self.teacher_checkpoint is not None and len(self.teacher_seeds) != 1:
            raise ConfigError(
                "protocol.teacher_seeds: a pretrained teacher (protocol.teacher_checkpoint) is "
                f"one teacher; give one seed, e.g. teacher_seeds: [0] (got {list(self.teacher_seeds)})"
            )

    def _check_label_noise(self) -> None:
        rates = list(self.teacher_label_noise)
        if not rates:
            raise ConfigError("protocol.teacher_label_noise: empty; give at least one rate, "
                              "e.g. teacher_label_noise: [0.0] (the clean teacher)")  # fmt: skip
        for rate in rates:
            if not 0.0 <= rate < 1.0:
                raise ConfigError(f"protocol.teacher_label_noise: {rate} is outside [0, 1); "
                                  "give fractions of the labels, e.g. [0.0, 0.1, 0.2]")  # fmt: skip
        if len(set(rates)) != len(rates):
            raise ConfigError(f"protocol.teacher_label_noise: a rate is listed twice: {rates}; "
                              "each rate is one teacher")  # fmt: skip
        if self.teacher_checkpoint is not None and any(rates):
            raise ConfigError("protocol.teacher_label_noise: a pretrained teacher "
                              "(protocol.teacher_checkpoint) is loaded, not trained; leave the "
                              "noise at [0.0]")  # fmt: skip

    @property
    def noise_rates(self) -> tuple[float | None, ...]:
        """Each rate as a RunSpec's label_noise: None for the clean teacher (0.0), so its run
        ids are those of a grid without the sweep."""
        return tuple(rate or None for rate in self.teacher_label_noise)

    @property
    def condition_names(self) -> tuple[str, ...]:
        return tuple(c if isinstance(c, str) else c.name for c in self.conditions)

    def loss_of(self, name: str) -> str | None:
        """Your own loss's 'package.module:function' for a condition of this grid (else None)."""
        return next((c.factory for c in self.conditions if getattr(c, "name", c) == name
                     and not isinstance(c, str)), None)  # fmt: skip

    def _check_features(self) -> None:
        from kdaudit.conditions import condition

        named = [c for c in self.condition_names if condition(c).features]
        if named and not self.feature_modules:
            raise ConfigError(
                f"protocol.feature_modules: conditions {named} match features at named modules; "
                "list them, e.g. feature_modules: [blocks.4, blocks.5]"
            )
        teacher = self.teacher_feature_modules
        if teacher and len(teacher) != len(self.feature_modules):
            raise ConfigError(
                "protocol.teacher_feature_modules: give one teacher module per entry of "
                f"protocol.feature_modules ({len(self.feature_modules)}), got {len(teacher)}"
            )

    @property
    def feature_pairs(self) -> tuple[tuple[str, str], ...]:
        """(student module, teacher module) per matched feature."""
        teacher = self.teacher_feature_modules or self.feature_modules
        return tuple(zip(self.feature_modules, teacher, strict=True))


@dataclass(frozen=True)
class AnalysisOptions:
    fdr_q: float = 0.05  # FDR level over the functional metrics of one (setting, control)
    fdr_method: str = "bh"  # bh: Benjamini-Hochberg (the paper); by: Benjamini-Yekutieli
    alpha_level: float = 0.05  # every other tested metric, uncorrected
    marginal_threshold: float = 0.10  # median relative improvement over SIDDO
    asymmetry_tolerance: float = 0.01  # |delta_incorrect - delta_correct| counted as equal
    baseline: str = "accuracy"  # best control B by mean accuracy, or "agreement" per bucket
    exclude_controls: tuple[str, ...] = ()  # never used as the paper's asymmetry baseline
    # the controls whose matrix cells (both scales) must agree for the robust asymmetry
    # label; () : the treatment's verdict controls (SIDDO and RCD for KD)
    asymmetry_controls: tuple[str, ...] = ()
    metrics: tuple[str, ...] = (*functional_metrics(), "accuracy", "loss")
    # targeted error transfer (text grids with protocol.teacher_data): greedy completions of
    # this prompt in the test text, counted per completion (the paper: "th" -> "a" / "e")
    targeted_prompt: str = "th"
    targeted_completions: tuple[str, ...] = ("a", "e")

    def __post_init__(self) -> None:
        # Checked when the config is loaded, not after hours of training.
        if self.baseline not in ("accuracy", "agreement"):
            raise ValueError(
                f"analysis.baseline: {self.baseline!r} is not allowed; choose accuracy or agreement"
            )
        if self.fdr_method not in ("bh", "by"):
            raise ValueError(
                f"analysis.fdr_method: {self.fdr_method!r} is not allowed; choose bh or by"
            )


@dataclass(frozen=True)
class StoreConfig:
    save_weights: bool = False


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    data: Any = field(metadata={"registry": "data"})
    model: Any = field(metadata={"registry": "model"})
    train: TrainConfig = TrainConfig()
    protocol: ProtocolConfig = ProtocolConfig()
    analysis: AnalysisOptions = AnalysisOptions()
    store: StoreConfig = StoreConfig()
    # Where datasets live; --data-dir overrides it, $KDAUDIT_DATA is used when neither is
    # set. Not part of any run's identity: the same files elsewhere give the same runs.
    data_dir: str | None = None

    @property
    def student_model(self) -> Any:
        return self.protocol.student_model or self.model

    def __post_init__(self) -> None:
        from kdaudit.conditions import condition

        only = [c for c in self.protocol.condition_names if condition(c).self_distillation_only]
        smaller = self.protocol.student_widths or self.pretrained_teacher
        if only and (not self.self_distillation or smaller):
            raise ConfigError(
                f"protocol.conditions: {only[0]} is a self-distillation control (the student "
                "starts from the teacher's architecture and data order); remove it, or remove "
                "protocol.student_model, student_widths or teacher_checkpoint"
            )

    @property
    def self_distillation(self) -> bool:
        return self.protocol.student_model is None

    @property
    def pretrained_teacher(self) -> bool:
        """The teacher is loaded from protocol.teacher_checkpoint, not trained."""
        return self.protocol.teacher_checkpoint is not None


# ---------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] = ()) -> ExperimentConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML:{where} {problem}; check the indentation "
                          "and the brackets there") from None  # fmt: skip
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file; give a YAML config") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    raw.setdefault("name", path.stem)
    _resolve_paths(raw, path.parent)
    for item in overrides:
        apply_override(raw, item)
    _complete_teacher_train(raw)
    return from_dict(ExperimentConfig, raw)


def _resolve_paths(raw: dict, folder: Path) -> None:
    """Paths written in a config file are relative to that file, not to the working
    directory (--set values stay relative to the working directory)."""
    sections = [(raw, "data_dir"), (raw.get("protocol"), "teacher_checkpoint")]
    for section, key in sections:
        value = section.get(key) if isinstance(section, dict) else None
        if isinstance(value, str) and value:
            section[key] = str((folder / Path(value).expanduser()).resolve())


def _complete_teacher_train(raw: dict) -> None:
    """protocol.teacher_train states what differs from `train`: fill in the rest."""
    protocol = raw.get("protocol")
    if isinstance(protocol, dict) and isinstance(protocol.get("teacher_train"), dict):
        protocol["teacher_train"] = {**(raw.get("train") or {}), **protocol["teacher_train"]}


def apply_override(raw: dict, item: str) -> None:
    """Apply one `dotted.key=value` override; the value is parsed as YAML (`0.5`, `[1, 2]`)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.epochs=5")
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
    node[leaf] = yaml.safe_load(value)


def from_dict(cls: type, raw: Any, where: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key {_join(where, unknown[0])!r}; allowed keys: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        key = _join(where, name)
        f = fields[name]
        if "registry" in f.metadata:
            values[name] = _registered(f.metadata, value, key)
        else:
            values[name] = _coerce(hints[name], value, key)
    missing = [
        n
        for n, f in fields.items()
        if n not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing key {_join(where, missing[0])!r}")
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where or 'config'}: {err}") from None


def _registered(metadata: Any, value: Any, key: str) -> Any:
    if value is None and metadata.get("optional"):
        return None
    if isinstance(value, dict) and "factory" in value and "name" not in value:
        value = {"name": "factory", **value}  # user code: {factory: "package.module:function"}
    if not isinstance(value, dict) or "name" not in value:
        raise ConfigError(f"{key}: expected a mapping with a 'name' key (a registered entry) "
                          "or a 'factory' key ('package.module:function', your own code)")  # fmt: skip
    registry = _registry(metadata["registry"])
    if value["name"] not in registry:
        raise ConfigError(
            f"{key}.name: unknown {registry.kind} {value['name']!r}; "
            f"registered: {', '.join(registry.names())}"
        )
    return from_dict(registry.get(value["name"]).config, value, key)


def parse_registered(kind: str, value: dict, key: str | None = None) -> Any:
    """A `data` or `model` section (a mapping with `name`) as its registered config class."""
    return _registered({"registry": kind}, value, key or kind)


def _registry(kind: str):
    if kind == "data":
        from kdaudit.data import DATASETS

        return DATASETS
    from kdaudit.models import MODELS

    return MODELS


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            value = [value]  # a scalar where a list is expected: `--set protocol.alphas=0.5`
        return tuple(_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key)
    return _scalar(hint, value, key)


def _scalar(hint: type, value: Any, key: str) -> Any:
    if hint is float and isinstance(value, str):
        try:  # PyYAML reads `1e-3` (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is Any or (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        return value
    raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r} ({type(value).__name__})")


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


# ---------------------------------------------------------------- saving


def to_dict(cfg: Any, drop_defaults: bool = False) -> Any:
    """Plain-data view of a config (tuples become lists), for YAML/JSON and hashing.

    drop_defaults leaves out fields at their default value (never `name`), so that adding a
    setting whose default keeps the old behaviour does not change the hash of old runs."""
    if dataclasses.is_dataclass(cfg):
        return {
            f.name: to_dict(getattr(cfg, f.name), drop_defaults)
            for f in dataclasses.fields(cfg)
            if not (drop_defaults and f.name != "name" and _at_default(cfg, f))
        }
    if isinstance(cfg, tuple | list):
        return [to_dict(v, drop_defaults) for v in cfg]
    return cfg


def _at_default(cfg: Any, f: dataclasses.Field) -> bool:
    if f.default is not dataclasses.MISSING:
        return getattr(cfg, f.name) == f.default
    if f.default_factory is not dataclasses.MISSING:
        return getattr(cfg, f.name) == f.default_factory()
    return False


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
