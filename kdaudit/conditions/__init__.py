"""Training conditions (PROTOCOL section 2): each one typed description in one registry.

A `Condition` says everything the rest of kdaudit asks about a condition: its role (the
teacher, a treatment whose transfer is tested, or a control), the grid axes the protocol
expands for it, the controls a treatment's verdict needs and those shown beside it, whether
it needs the trained teacher, how the report names, orders and explains it, and the
objective it trains with (`objective`, a 'module:function' resolved when a run is built, so
that this module imports no torch: the statistics and the report read it on stored tables).

The objectives themselves (kdaudit.conditions.objectives, features) share one loss form and
differ only by the target they supply. Nothing outside this package names a condition.

Your own KD loss is a treatment too (`loss_condition`): a function
fn(student_logits, teacher_logits, labels, alpha, temperature) -> loss, named in a config as
`{factory: "package.module:function", name: NAME}` among `protocol.conditions`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kdaudit.errors import ConfigError
from kdaudit.registry import Registry

ROLES = ("teacher", "treatment", "control")
_OBJECTIVES = "kdaudit.conditions.objectives"


@dataclass(frozen=True)
class Condition:
    name: str
    role: str  # teacher | treatment (its transfer is tested) | control
    objective: str  # 'module:function' building the objective (see objectives.build_objective)
    params: tuple[str, ...] = ()  # grid axes the protocol expands: alpha, temperature
    # treatments: the controls the verdict needs, in order; the first is the reference of the
    # relative improvement (the independent-model control). A control is matched to a
    # treatment's setting on the control's own params.
    controls: tuple[str, ...] = ()
    shown_beside: tuple[
        str, ...
    ] = ()  # treatments: controls tested when present, not in the verdict
    needs_teacher: bool = False  # trains on the trained teacher's outputs or features
    features: bool = (
        False  # hooks the student, trains parameters of its own, needs the teacher model
    )
    display: str = ""  # its name in the report (default: the name in capitals)
    order: int = 100  # position among the conditions of a table
    note: str = ""  # one line for the report's protocol decisions ("" : none)
    # a condition this one equals up to a constant, at the given params of the other (LS and
    # RCD at T = 1): the report measures the difference
    equals: str | None = None
    equals_at: tuple[tuple[str, float], ...] = ()
    long_name: str = ""  # in sentences and titles ("Label smoothing")
    plain: str = ""  # what it is, in one sentence a newcomer understands (report, glossary)
    equals_note: str = ""  # what the comparison with `equals` is, for the report
    loss: str | None = None  # your own KD loss ('package.module:function'), for loss_condition
    # a control that changes the protocol's pairing on purpose (DISDO): its initial weights
    # seeded by the student seed ("student"; "" : the protocol's rule), its data order the
    # teacher's ("teacher") or the student seed's ("student"); self-distillation only if set
    init_from: str = ""
    data_order_from: str = "student"
    self_distillation_only: bool = False
    # a remedy: a treatment that changes another (KD) to refuse the teacher's mistakes; it
    # is tested against that treatment too (shown beside it) and set beside it in
    # tables/remedies.csv
    remedy_of: str | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"condition {self.name}: role must be one of {ROLES}")

    @property
    def label(self) -> str:
        return self.display or self.name.upper()

    @property
    def is_treatment(self) -> bool:
        return self.role == "treatment"


CONDITIONS: Registry[Condition] = Registry("condition")


@dataclass(frozen=True)
class Design:
    """A treatment's controls, each with the setting parameters it shares with the treatment's
    setting (every control also shares the student width)."""

    verdict: Mapping[str, tuple[str, ...]]  # the controls the verdict needs, in order
    also: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # tested, shown only

    @property
    def controls(self) -> dict[str, tuple[str, ...]]:
        return {**self.verdict, **self.also}


Designs = Mapping[str, Design]  # treatment condition -> its design


def designs() -> dict[str, Design]:
    """Per treatment (in registration order), its controls, each matched to a treatment's
    setting on the control's own params."""
    matched = lambda cs: {c: CONDITIONS.get(c).params for c in cs}  # noqa: E731
    return {
        c.name: Design(matched(c.controls), matched(c.shown_beside))
        for c in CONDITIONS.entries()
        if c.is_treatment
    }


def condition(name: str) -> Condition:
    return CONDITIONS.get(name)


def label(name: str) -> str:
    """The report's name of a condition; an unknown name (a compare manifest's) as given."""
    return CONDITIONS.get(name).label if name in CONDITIONS else name


def order(name: str) -> int:
    return CONDITIONS.get(name).order if name in CONDITIONS else len(CONDITIONS.entries()) + 100


def builtin() -> list[Condition]:
    """The conditions kdaudit ships (not the user losses registered in this process)."""
    return [c for c in CONDITIONS.entries() if c.loss is None]


DEFAULT_GRID = ("siddo", "kd", "rcd")  # the paper's self-distillation grid


def is_treatment(name: str) -> bool:
    return name in CONDITIONS and CONDITIONS.get(name).is_treatment


def resolve(reference: str) -> Callable:
    """The function a 'module:function' reference names (built-in objectives)."""
    module, _, attr = reference.partition(":")
    return getattr(importlib.import_module(module), attr)


# ---------------------------------------------------------------- your own KD loss


@dataclass(frozen=True)
class LossConditionConfig:
    """A treatment trained with your own distillation loss, as written in a config:
    `{factory: "package.module:function", name: NAME}` among `protocol.conditions`."""

    factory: str  # package.module:function, fn(student_logits, teacher_logits, labels, alpha, T)
    name: str
    controls: tuple[str, ...] = ("siddo", "rcd")  # the controls its verdict needs
    display: str = ""  # its name in the report (default: NAME in capitals)


def loss_condition(cfg: LossConditionConfig) -> Condition:
    """Register (once per process) the treatment `cfg` describes; the same name with another
    loss is an error."""
    entry = Condition(
        cfg.name, "treatment", f"{_OBJECTIVES}:loss_objective", params=("alpha", "temperature"),
        controls=tuple(cfg.controls), shown_beside=_beside(cfg.controls), needs_teacher=True, display=cfg.display, order=50,
        note=f"{cfg.display or cfg.name.upper()}: your own KD loss {cfg.factory}, trained on "
        "the same paired seeds and batches as KD and tested against the same controls.",
        loss=cfg.factory,
    )  # fmt: skip
    if cfg.name in CONDITIONS:
        if CONDITIONS.get(cfg.name) != entry:
            raise ConfigError(
                f"protocol.conditions: the name {cfg.name!r} is taken by another condition "
                f"({CONDITIONS.get(cfg.name).loss or 'built in'}); choose another name"
            )
        return entry
    unknown = [c for c in entry.controls if c not in CONDITIONS or condition(c).role != "control"]
    if unknown:
        controls = [c.name for c in CONDITIONS.entries() if c.role == "control"]
        raise ConfigError(f"protocol.conditions: {cfg.name}: unknown control {unknown[0]!r}; "
                          f"controls: {', '.join(controls)}")  # fmt: skip
    return CONDITIONS.add(entry)


def _beside(controls) -> tuple[str, ...]:
    """The controls shown beside your own loss: KD's, less those its verdict needs."""
    return tuple(c for c in ("ls", "disdo") if c not in controls)


def parse_entry(raw: Any, key: str = "protocol.conditions") -> str | LossConditionConfig:
    """One item of protocol.conditions: a registered name, or your own loss (a mapping)."""
    if isinstance(raw, LossConditionConfig):
        return raw
    if isinstance(raw, str):
        if raw not in CONDITIONS:
            names = sorted(c.name for c in builtin())
            raise ConfigError(f"{key}: {raw!r} is not allowed; choose one of "
                              f"{', '.join(names)}, or your own loss as "
                              '{factory: "package.module:function", name: NAME}')  # fmt: skip
        return raw
    if not isinstance(raw, Mapping) or set(raw) - {"factory", "name", "controls", "display"}:
        raise ConfigError(
            f"{key}: {raw!r} is neither a condition name nor your own loss; write "
            '{factory: "package.module:function", name: NAME} (optional: controls, display)'
        )
    missing = [k for k in ("factory", "name") if k not in raw]
    if missing:
        raise ConfigError(f"{key}: your own loss needs {missing[0]!r}, e.g. "
                          '{factory: "mypkg.losses:reverse_kl", name: rkd}')  # fmt: skip
    controls = raw.get("controls", ("siddo", "rcd"))
    return LossConditionConfig(str(raw["factory"]), str(raw["name"]), tuple(controls),
                               str(raw.get("display", "")))  # fmt: skip


def _add(name: str, role: str, objective: str, **facts: Any) -> None:
    """A built-in condition; `objective` names a function of kdaudit.conditions.objectives,
    or any 'module:function'."""
    reference = objective if ":" in objective else f"{_OBJECTIVES}:{objective}"
    CONDITIONS.add(Condition(name, role, reference, **facts))


_add(
    "teacher",
    "teacher",
    "cross_entropy",
    display="Teacher",
    order=0,
    long_name="Teacher",
    plain="the model being distilled, trained on the labels alone",
)
_add("siddo", "control", "cross_entropy", display="SIDDO", order=1,
     long_name="Same initialisation, different data order",
     plain="an independent student trained on the labels alone, from the same starting weights "
     "as its KD student but another order of the data: how similar to the teacher a model "
     "gets without distillation")  # fmt: skip
_add("kd", "treatment", "kd", params=("alpha", "temperature"), controls=("siddo", "rcd"),
     shown_beside=("ls", "disdo"), needs_teacher=True, display="KD", order=2,
     long_name="Knowledge distillation",
     plain="the student trained on the labels and on the teacher's softened output "
     "distribution, weighted by alpha, at temperature T",
     note="Supported transfer: a strict majority of the functional metrics significant against "
     "both SIDDO and RCD (at the same alpha and T); LS and DISDO are tested and shown but not "
     "used in the verdict.")  # fmt: skip
_add("rcd", "control", "rcd", params=("alpha", "temperature"), display="RCD", order=3,
     long_name="Random control distillation",
     plain="the KD loss with the teacher's distribution replaced by a uniform one: the "
     "regularisation of KD without any of the teacher's knowledge")  # fmt: skip
_add("ls", "control", "ls", params=("alpha",), display="LS", order=4, equals="rcd",
     equals_at=(("temperature", 1.0),), long_name="Label smoothing",
     plain="the labels smoothed toward uniform by epsilon = alpha; equal to RCD at T = 1 up "
     "to a constant",
     equals_note="Label smoothing at ε = α against RCD at the same α and T = 1 (equal losses "
     "up to a constant)")  # fmt: skip
_add("disdo", "control", "cross_entropy", display="DISDO", order=5, init_from="student",
     data_order_from="teacher", self_distillation_only=True,
     long_name="Different initialisation, same data order",
     plain="an independent model from other starting weights that sees the data in the "
     "teacher's own order",
     note="DISDO (different initialisation, same data order as the teacher): an independent "
     "model that shares the teacher's minibatch order, seeded by the student seed; "
     "self-distillation only.")  # fmt: skip
_REMEDY = dict(
    params=("alpha", "temperature"),
    controls=("siddo", "rcd"),
    shown_beside=("ls", "disdo", "kd"),
    needs_teacher=True,
    remedy_of="kd",
)
_add("kd_masked", "treatment", "kd_masked", display="KD-masked", order=8, **_REMEDY,
     long_name="KD masked where the teacher is wrong",
     plain="KD only on the training examples the teacher gets right",
     note="KD-masked: the KD term only on training examples the teacher classifies "
     "correctly, CE alone on the others; tested against SIDDO and RCD like KD, and against KD "
     "at the same alpha and T.")  # fmt: skip
_add("kd_confidence", "treatment", "kd_confidence", display="KD-confidence", order=9,
     **_REMEDY, long_name="Confidence-weighted KD",
     plain="KD weighted per example by the teacher's probability of the true label",
     note="KD-confidence: each example's KD term weighted by the teacher's "
     "probability of its true label; tested like KD-masked.")  # fmt: skip
_add("kd_corrected", "treatment", "kd_corrected", display="KD-corrected", order=10,
     **_REMEDY, long_name="KD from a corrected teacher",
     plain="KD from the teacher's distribution with its wrong answers moved to the true label",
     note="KD-corrected: where the teacher is wrong, the mass of its wrong top-1 "
     "class is moved to the true label before distilling; tested like KD-masked.")  # fmt: skip
_add("fmkd", "treatment", "kdaudit.conditions.features:fmkd", params=("alpha",), controls=("siddo", "fmrc"),
     needs_teacher=True, features=True, display="FMKD", order=6,
     long_name="Feature-map distillation",
     plain="the student's inner features pulled toward the teacher's (mean squared error)",
     note="Feature-map matching (FMKD): supported when a strict majority of the functional "
     "metrics are significant against both SIDDO and FMRC (the same loss with a fixed random "
     "target of the teacher feature's shape and standard deviation, at the same alpha).")  # fmt: skip
_add("fmrc", "control", "kdaudit.conditions.features:fmrc", params=("alpha",), needs_teacher=True, features=True,
     display="FMRC", order=7, long_name="Feature-map random control",
     plain="feature-map distillation toward a fixed random target of the same shape and scale")  # fmt: skip
