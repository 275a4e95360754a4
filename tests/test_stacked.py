"""Stacked training (kdaudit.engine.stacking) against training alone, the --stack executor, and the
CUDA speed-up switches on the CPU (kdaudit.engine.accel).

Tolerance, stacked vs alone: the forward pass is bitwise the same, but the batched matmul
that computes a weight's gradient in the stack (bmm) sums in another order than the one
alone (mm), so each step differs by rounding (~1 ulp); training compounds it. After the short
trainings here (21 steps) weights agree to 1e-5 (relative 1e-4) and test predictions exactly.
Over a full training the difference grows as any change of floating-point order does (30
epochs of the default audit: 2-10% of test predictions differ), which is why a model's
result must not depend on the stack around it: that is bitwise, tested below."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kdaudit.conditions.objectives import StackedLosses, build_objective
from kdaudit.config import ConfigError, TrainConfig, load_config
from kdaudit.data import TensorData
from kdaudit.engine.accel import _COMPILED, Accel, accel_for, compiled
from kdaudit.engine.loop import NonFiniteLoss, batch_order, total_steps, train
from kdaudit.engine.stacking import (
    Member,
    StackedState,
    StackMismatch,
    _chain_forward,
    _linear_chain,
    _stacked_forward,
    _weights,
    random_draws,
    stacks_alone,
    train_one,
    train_stacked,
    unstackable,
)
from kdaudit.engine.teachers import cached_targets, model_targets
from kdaudit.executors import ExecutorConfig, run_grid
from kdaudit.executors.local_stack import _REFUSED, stack_groups
from kdaudit.models import MODELS, build_model
from kdaudit.models.gpt import GPTConfig
from kdaudit.models.mlp import MLPConfig
from kdaudit.models.vision import CNNConfig
from kdaudit.protocol import expand
from kdaudit.store import RunStore
from tests.conftest import write_config
from tests.fault_helpers import assert_same_runs

K = 4  # classes
CFG = TrainConfig(batch_size=32, epochs=3, lr=0.01)
MLP = MLPConfig(width=16, depth=2)
WEIGHT_TOL = {"atol": 1e-5, "rtol": 1e-4}


def _vectors(n: int = 200, d: int = 12) -> TensorData:
    g = torch.Generator().manual_seed(0)
    return TensorData(torch.randn(n, d, generator=g), torch.randint(0, K, (n,), generator=g),
                      torch.randn(64, d, generator=g), torch.randint(0, K, (64,), generator=g),
                      K)  # fmt: skip


def _images(n: int = 96) -> TensorData:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    return TensorData(x, torch.randint(0, K, (n,), generator=g), x[:16], torch.arange(16) % K, K)


TEACHER = torch.randn(200, K, generator=torch.Generator().manual_seed(2))  # (N, K) logits


def _member(condition: str, seed: int, model_cfg=MLP, data=None):
    data = data or _vectors()
    alpha = None if condition == "siddo" else 0.5
    objective = build_objective(condition, alpha, 2.0, K, cached_targets(TEACHER))
    return Member(build_model(model_cfg, data.input_shape, K, 0), objective, seed)


def _alone(member: Member, data, cfg=CFG) -> Member:
    train(member.model, data, member.objective, cfg, member.data_seed)
    return member


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("condition", ["siddo", "kd", "rcd"])
def test_a_stacked_model_ends_where_it_would_alone(condition):
    data = _vectors()
    stack = [_member(condition, 10), _member("kd", 11), _member("rcd", 12)]
    results = train_stacked(stack, data, CFG)
    alone = _alone(_member(condition, 10), data)
    torch.testing.assert_close(_flat(stack[0].model), _flat(alone.model), **WEIGHT_TOL)
    z_stack, z_alone = stack[0].model(data.test_x), alone.model(data.test_x)
    torch.testing.assert_close(z_stack, z_alone, **WEIGHT_TOL)
    assert torch.equal(z_stack.argmax(1), z_alone.argmax(1))
    assert results[0].steps == 21 and results[0].engine["stack"]["size"] == 3


def test_a_stack_computing_its_objectives_together_trains_the_bits_of_one_by_one(monkeypatch):
    """StackedLosses (the paper's objectives computed at once) against the same stack with
    each objective called alone: every model's weights equal bit for bit, across two data
    seeds, KD at alpha = 0, plain CE and RCD."""
    data = _vectors()

    def stack():
        kd0 = Member(build_model(MLP, data.input_shape, K, 0),
                     build_objective("kd", 0.0, 2.0, K, cached_targets(TEACHER)), 11)  # fmt: skip
        return [_member("siddo", 10), _member("kd", 10), _member("rcd", 11), kd0]

    together = stack()
    train_stacked(together, data, CFG)
    monkeypatch.setattr(StackedLosses, "of", classmethod(lambda cls, objectives: None))
    one_by_one = stack()
    train_stacked(one_by_one, data, CFG)
    for a, b in zip(together, one_by_one, strict=True):
        assert torch.equal(_flat(a.model), _flat(b.model))
    assert not torch.equal(_flat(together[0].model), _flat(together[1].model))


def _recording(member: Member, seen: list) -> Member:
    def objective(logits, batch):
        seen.append((batch.idx.clone(), batch.x.clone()))
        return member.objective(logits, batch)

    return replace(member, objective=objective)


def test_each_stacked_model_sees_exactly_its_solo_batches_augmentation_included():
    data, cfg = _images(), replace(CFG, augment="crop_flip", epochs=2)
    cnn = CNNConfig(width=4, depth=1)
    seen = {s: [] for s in (10, 11)}
    stack = [_recording(_member("siddo", s, cnn, data), seen[s]) for s in (10, 11)]
    train_stacked(stack, data, cfg)
    solo: list = []
    _alone(_recording(_member("siddo", 11, cnn, data), solo), data, cfg)
    assert [i.tolist() for i, _ in seen[11]] == [b.tolist() for b in batch_order(96, cfg, 11)]
    assert all(torch.equal(a[1], b[1]) for a, b in zip(seen[11], solo, strict=True))
    assert not torch.equal(seen[10][0][1], seen[11][0][1])  # the streams are distinct


def test_a_stacked_models_result_does_not_depend_on_the_stack_around_it():
    data = _vectors()
    ends = []
    for others in ([], ["siddo"], ["kd", "rcd"], ["rcd", "kd", "siddo", "kd"]):
        stack = [_member(c, 20 + i) for i, c in enumerate(others)] + [_member("kd", 10)]
        train_stacked(stack, data, CFG)
        ends.append(_flat(stack[-1].model))
    assert all(torch.equal(ends[0], e) for e in ends[1:])  # bitwise, for any size and position


def test_a_nonfinite_model_fails_alone_and_the_others_train_on():
    data = _vectors()

    def poisoned(logits, batch):  # NaN from its 10th step on
        poisoned.calls += 1
        return logits.sum() * (float("nan") if poisoned.calls >= 10 else 0.0) + logits.mean()

    poisoned.calls = 0
    stack = [
        _member("siddo", 10),
        Member(build_model(MLPConfig(width=16, depth=2), (12,), K, 0), poisoned, 11),
    ]
    results = train_stacked(stack + [_member("kd", 12)], data, CFG)
    assert isinstance(results[1], NonFiniteLoss) and results[1].step == 20
    control = [_member("siddo", 10), _member("kd", 12)]
    train_stacked(control, data, CFG)
    assert torch.equal(_flat(stack[0].model), _flat(control[0].model))


def test_a_stacked_language_model_with_tied_weights_ends_where_it_would_alone():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 5, (64, 6), generator=g)  # (N, T)
    data = TensorData(tokens, torch.roll(tokens, -1, 1), tokens[:8], tokens[:8], 5)
    gpt = GPTConfig(n_layer=1, n_embd=8, n_head=2, dropout=0.0)

    def member(seed):
        ce = build_objective("siddo", None, None, 5)
        return Member(build_model(gpt, (6,), 5, 0), ce, seed)

    stack = [member(10), member(11)]
    train_stacked(stack, data, CFG)
    alone = _alone(member(11), data)
    torch.testing.assert_close(_flat(stack[1].model), _flat(alone.model), **WEIGHT_TOL)
    assert stack[1].model.head.weight is stack[1].model.tok.weight  # still tied


def _gpt_data() -> TensorData:
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 5, (64, 6), generator=g)  # (N, T)
    return TensorData(tokens, torch.roll(tokens, -1, 1), tokens[:8], tokens[:8], 5)


def test_only_models_without_random_draws_stack_across_data_seeds():
    dropout = [build_model(GPTConfig(n_layer=1, n_embd=8, n_head=2), (4,), 5, 0)] * 2
    assert "dropout 0.2" in unstackable(dropout, [10, 11])
    assert unstackable(dropout, [10, 10]) is None  # one seed: one stream of masks
    batch_norm = [nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))] * 2
    assert unstackable(batch_norm, [10, 11]) is None
    ce = build_objective("siddo", None, None, 5)
    with pytest.raises(ValueError, match="only runs of one seed stack"):
        train_stacked([Member(dropout[0], ce, 10), Member(dropout[1], ce, 11)], _gpt_data(), CFG)


def _bn_member(condition: str, seed: int) -> Member:
    torch.manual_seed(0)  # one init for every member, as one student seed's conditions share
    # no conv bias before the batch norm (as in ResNets): its true gradient is 0, and Adam
    # would turn the rounding noise standing in for it into full-size steps
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 8 * 8, K))  # fmt: skip
    alpha = None if condition == "siddo" else 0.5
    return Member(model, build_objective(condition, alpha, 2.0, K, cached_targets(TEACHER)), seed)


@pytest.mark.parametrize("seeds", [(10, 10, 10), (10, 11, 12)], ids=["one seed", "three seeds"])
def test_batch_norm_models_stack_and_keep_their_own_running_statistics(seeds):
    data, cfg = _images(), replace(CFG, augment="crop_flip", epochs=2)
    conditions = ("siddo", "kd", "rcd")
    stack = [_bn_member(c, s) for c, s in zip(conditions, seeds, strict=True)]
    train_stacked(stack, data, cfg)
    for k, (condition, seed) in enumerate(zip(conditions, seeds, strict=True)):
        alone = _alone(_bn_member(condition, seed), data, cfg)
        torch.testing.assert_close(_flat(stack[k].model), _flat(alone.model), **WEIGHT_TOL)
        for (name, a), b in zip(stack[k].model.named_buffers(), alone.model.buffers(), strict=True):
            torch.testing.assert_close(a, b, **WEIGHT_TOL, msg=name)
    means = [m.model[1].running_mean for m in stack]
    assert not torch.equal(means[0], means[1])  # each its own statistics, not shared
    assert int(stack[0].model[1].num_batches_tracked) == total_steps(data.n_train, cfg)


def _gpt_member(condition: str, teacher_targets=None, dropout=0.2) -> Member:
    gpt = GPTConfig(n_layer=1, n_embd=8, n_head=2, dropout=dropout)
    alpha = None if condition == "siddo" else 0.5
    objective = build_objective(condition, alpha, 2.0, 5, teacher_targets)
    return Member(build_model(gpt, (6,), 5, 0), objective, 10)


def test_one_seeds_conditions_stack_with_dropout_and_end_where_they_would_alone():
    data = _gpt_data()
    teacher = build_model(GPTConfig(n_layer=1, n_embd=8, n_head=2), (6,), 5, 1)
    conditions = ("siddo", "kd", "rcd")
    stack = [_gpt_member(c, model_targets(teacher)) for c in conditions]
    train_stacked(stack, data, CFG)
    for member, condition in zip(stack, conditions, strict=True):
        alone = _alone(_gpt_member(condition, model_targets(teacher)), data)
        torch.testing.assert_close(_flat(member.model), _flat(alone.model), **WEIGHT_TOL)
    # the masks matter: without dropout the same training ends elsewhere
    nodrop = _alone(_gpt_member("siddo", dropout=0.0), data)
    assert (_flat(nodrop.model) - _flat(stack[0].model)).abs().max() > 1e-3


def test_a_dropout_models_result_does_not_depend_on_its_seeds_stack():
    data = _gpt_data()
    ends = []
    for others in ([], ["siddo"], ["rcd", "siddo", "rcd"]):
        stack = [_gpt_member(c) for c in others] + [_gpt_member("rcd")]
        train_stacked(stack, data, CFG)
        ends.append(_flat(stack[-1].model))
    assert all(torch.equal(ends[0], e) for e in ends[1:])


def test_one_teacher_forward_per_batch_serves_a_stacks_kd_students():
    data, cfg = _images(), replace(CFG, augment="crop_flip", epochs=2)
    cnn = CNNConfig(width=4, depth=1)
    teacher = build_model(cnn, data.input_shape, K, 1)
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    targets = model_targets(teacher)
    stack = [Member(build_model(cnn, data.input_shape, K, 0),
                    build_objective("kd", a, 2.0, K, targets), 10)
             for a in (0.1, 0.5, 0.9)]  # fmt: skip
    train_stacked(stack, data, cfg)
    assert len(calls) == total_steps(data.n_train, cfg)  # not 3 per step
    alone = Member(build_model(cnn, data.input_shape, K, 0),
                   build_objective("kd", 0.9, 2.0, K, model_targets(teacher)), 10)  # fmt: skip
    _alone(alone, data, cfg)
    torch.testing.assert_close(_flat(stack[2].model), _flat(alone.model), **WEIGHT_TOL)


def _spec(seed: int, condition: str):
    return SimpleNamespace(teacher_id="t", data="d", model="m", train="c", data_seed=seed,
                           run_id=f"{condition}-{seed}", checkpoint=None, condition=condition)  # fmt: skip


def test_a_plain_mlps_stack_multiplies_weights_stored_transposed_bitwise_as_alone():
    """kdaudit's MLP stacks through batched multiplies of (K, in, out) weights: its logits
    are each model's own bit for bit, and unstacking gives back the model's layout."""
    torch.manual_seed(0)
    models = [build_model(MLPConfig(width=16, depth=2), (12,), K, s) for s in range(3)]
    chain = _linear_chain(models[0])
    assert [kind for kind, _ in chain] == ["flatten", "linear", "relu", "linear", "relu", "linear"]
    state = StackedState(models, _weights(chain))
    assert state.views()["1.weight"].shape == (3, 12, 16)  # (K, in, out); alone (16, 12)
    x = torch.randn(32, 12)
    logits = _chain_forward(chain)(state.views(), state.buffers, x.expand(3, -1, -1))
    for k, model in enumerate(models):
        assert torch.equal(logits[k], model(x))
    with torch.no_grad():
        state.views()["1.weight"][1, 0, 5] = 7.0  # input 0 -> unit 5 of model 1
    state.unstack(models)
    assert models[1][1].weight[5, 0] == 7.0 and models[0][1].weight[5, 0] != 7.0


def test_an_mlp_run_alone_on_the_cpu_is_a_stack_of_one_with_the_bits_of_any_stack():
    data = _vectors()
    alone = _member("kd", 10)
    assert stacks_alone(alone.model, alone.objective, "cpu")
    assert not stacks_alone(alone.model, alone.objective, "cuda")
    cnn = build_model(CNNConfig(width=4, depth=1), (1, 8, 8), K, 0)
    assert not stacks_alone(cnn, alone.objective, "cpu")
    projection = nn.Linear(2, 2)  # an objective that trains parameters of its own
    assert not stacks_alone(alone.model, projection, "cpu")
    result = train_one(alone.model, data, alone.objective, CFG, 10)
    assert result.engine["stack"]["size"] == 1
    stack = [_member("siddo", 11), _member("kd", 10), _member("rcd", 12)]
    train_stacked(stack, data, CFG)
    assert torch.equal(_flat(alone.model), _flat(stack[1].model))


class _Wrapped(nn.Sequential):
    pass


@pytest.mark.parametrize("layers", [
    lambda: [nn.Linear(12, 8), nn.Dropout(0.1), nn.Linear(8, K)],
    lambda: [nn.Linear(12, 8, bias=False), nn.ReLU(), nn.Linear(8, K)],
    lambda: [nn.Linear(12, 8), nn.Flatten(), nn.Linear(8, K)],  # flatten only first
    lambda: [nn.Flatten(0), nn.Linear(12, K)],
    lambda: [nn.Linear(12, 8), nn.GELU(), nn.Linear(8, K)],
    lambda: [nn.ReLU()],  # no linear layer
])  # fmt: skip
def test_only_plain_mlps_take_the_batched_multiply_path(layers):
    assert _linear_chain(nn.Sequential(*layers())) is None
    plain = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, K))
    assert _linear_chain(plain) is not None
    assert _linear_chain(_Wrapped(*plain)) is None  # a subclass may change forward
    plain[0].register_forward_hook(lambda module, args, out: out * 2)
    assert _linear_chain(plain) is None
    assert _linear_chain(build_model(CNNConfig(width=4, depth=1), (1, 8, 8), K, 0)) is None


def test_stacks_keep_a_seeds_paired_runs_together():
    todo = [_spec(seed, c) for seed in (10, 11, 12) for c in ("siddo", "kd", "rcd")]
    ids = lambda groups: [[s.run_id for s in g] for g in groups]  # noqa: E731
    assert ids(stack_groups(todo, 3)) == [[s.run_id for s in todo[i : i + 3]] for i in (0, 3, 6)]
    assert ids(stack_groups(todo, 7)) == [ids([todo[:6]])[0], ids([todo[6:]])[0]]
    assert ids(stack_groups(todo, 2)) == [
        ["siddo-10", "kd-10"], ["rcd-10"], ["siddo-11", "kd-11"], ["rcd-11"],
        ["siddo-12", "kd-12"], ["rcd-12"],
    ]  # fmt: skip


def test_the_stack_executor_stores_every_run_reproducibly_whatever_the_stacks(
    tiny_config, tmp_path
):
    cfg = load_config(tiny_config)
    grid = expand(cfg)
    run_grid(cfg, tmp_path / "seq", ExecutorConfig(), "cpu")
    for name, size in (("s4", 4), ("s2", 2)):  # resume after a crash forms other stacks
        outcome = run_grid(cfg, tmp_path / name, ExecutorConfig(stack=size), "cpu")
        assert outcome.completed == 7 and not outcome.failed
    assert_same_runs(grid, tmp_path / "s4", tmp_path / "s2")
    # on the CPU an MLP run trains as a stack of one when not stacked (train_one): the same
    # bits as in any stack, so the default and --stack agree exactly
    assert_same_runs(grid, tmp_path / "seq", tmp_path / "s4")
    seq, stacked = RunStore(tmp_path / "seq"), RunStore(tmp_path / "s4")
    for spec in grid.runs:
        a, b = seq.record(spec.run_id), stacked.record(spec.run_id)
        assert a["engine"]["stack"]["size"] == 1 and b["engine"]["stack"]["size"] >= 1


@pytest.mark.parametrize(
    ("options", "message"),
    [({"stack": 0}, "stack: must be >= 1"), ({"stack": 2, "workers": 2}, "sequential local")],
)
def test_stack_options_are_checked(options, message):
    with pytest.raises(ConfigError, match=message):
        ExecutorConfig(**options)


def test_the_cuda_speed_ups_change_nothing_on_the_cpu():
    data = _vectors()
    fast = replace(CFG, precision="bf16", channels_last=True, compile=True)
    a, b = _alone(_member("kd", 10), data), _alone(_member("kd", 10), data, fast)
    assert torch.equal(_flat(a.model), _flat(b.model))
    assert accel_for(a.model, fast, torch.device("cpu")) == Accel()
    cuda = accel_for(build_model(CNNConfig(), (1, 8, 8), K, 0), fast, torch.device("cuda"))
    assert cuda == Accel(bf16=True, channels_last=True, compile=True)


def test_new_train_settings_are_checked_and_leave_run_ids_alone(tiny_config):
    with pytest.raises(ConfigError, match="train.precision: 'fp16' is not allowed"):
        load_config(tiny_config, ["train.precision=fp16"])
    plain = expand(load_config(tiny_config)).runs
    explicit = expand(load_config(tiny_config, ["train.precision=fp32", "train.compile=false"]))
    assert [r.run_id for r in plain] == [r.run_id for r in explicit.runs]


def test_one_compiled_function_serves_every_model_of_an_architecture():
    _COMPILED.clear()
    models = [build_model(MLPConfig(width=8, depth=1), (12,), K, s) for s in (0, 1)]
    x = _vectors().test_x
    for model in models:
        out = compiled(model, backend="eager")(
            dict(model.named_parameters()), dict(model.named_buffers()), x
        )
        assert torch.equal(out, model(x))
    assert len(_COMPILED) == 1


def test_the_compiled_stacked_forward_trains_like_the_plain_one_whatever_the_models_mode():
    """Dynamo traces the vmapped training forward (eager backend: no C++ compiler needed):
    batch statistics, running-statistics updates and one dropout mask for the stack."""
    _COMPILED.clear()
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),
                            nn.ReLU(), nn.Dropout(0.3), nn.Flatten(), nn.Linear(4 * 8 * 8, K))
              for _ in range(3)]  # fmt: skip
    for model in models:
        model.eval()  # the training forward must not follow the mode the model is left in
    states = [StackedState(models) for _ in range(2)]
    x = torch.randn(3, 16, 1, 8, 8)  # (K, B, C, H, W)
    torch.manual_seed(1)
    fast = compiled(models[0], backend="eager", stacked=True)(
        states[0].views(), states[0].buffers, x
    )
    torch.manual_seed(1)
    plain = _stacked_forward(models[0], compile=False)(states[1].views(), states[1].buffers, x)
    assert torch.equal(fast, plain)
    assert torch.equal(states[0].buffers["1.running_mean"], states[1].buffers["1.running_mean"])
    assert states[0].buffers["1.num_batches_tracked"].tolist() == [1, 1, 1]


# Every registered architecture, small: (config overrides, input shape, token inputs).
REGISTERED = {
    "mlp": ({"width": 8}, (12,), False),
    "cnn1d": ({"width": 4, "depth": 1}, (1, 16), False),
    "cnn": ({"width": 4, "depth": 1}, (1, 8, 8), False),
    # 32x32: batch norm over the 1x1 maps an 8x8 input leaves would normalise 4 numbers,
    # amplifying rounding until the comparison says nothing
    "resnet18": ({}, (3, 32, 32), False),
    "resnet50": ({}, (3, 32, 32), False),
    "vgg19": ({}, (3, 32, 32), False),
    "vgg19_bn": ({}, (3, 32, 32), False),
    "vit": ({"depth": 1, "width": 16, "mlp_dim": 16, "heads": 2, "dropout": 0.1}, (3, 8, 8), False),
    "vggish": ({"channels": (4, 8, 8), "convs": (1, 1, 1), "dropout": 0.1}, (1, 16, 16), False),
    "audio_cnn": ({"width": 4}, (1, 16, 16), False),
    "ast": ({"dim": 16, "depth": 1, "heads": 2, "dropout": 0.1}, (1, 16, 16), False),
    "nanogpt": ({"n_layer": 1, "n_head": 2, "n_embd": 8}, (6,), True),
    "picogpt": ({"n_layer": 1, "n_head": 2, "n_embd": 8}, (6,), True),
}
# Deep batch-norm networks at init amplify fp32 rounding chaotically: after 4 SGD steps a
# stacked ResNet-50 differed from its solo twin by 0.27 in fp32 and by 1.8e-10 in float64.
# These are compared in float64, where "ends where it would alone" can be tested tightly.
FLOAT64 = {"resnet50", "vgg19_bn"}
FLOAT64_TOL = {"atol": 1e-7, "rtol": 1e-7}
# Dropout on nn.MultiheadAttention's output (transposed in memory): vmap draws its mask in
# another order than the model alone does (torch 2.14), so these refuse to stack.
REFUSED = {"vit", "ast"}
USER_CODE = {"factory", "in_memory"}
DEEP_TOL = {
    "atol": 1e-4,
    "rtol": 1e-3,
}  # up to 50 layers and 11M weights: more rounding  # stand-ins for the user's own models (test_api.py)


def test_every_registered_architecture_has_a_stacking_case():
    assert set(REGISTERED) | USER_CODE == set(MODELS.names())


@pytest.mark.parametrize("name", sorted(REGISTERED))
def test_every_registered_architecture_stacks_one_seeds_runs(name):
    """Batch norm, dropout, attention, tied weights: two paired runs trained as one stack end
    where each ends alone, or the stack refuses to train before its first step. SGD: Adam
    turns the rounding noise in an exactly-zero gradient (a conv bias before batch norm, as
    in VGG19-BN) into full-size steps."""
    overrides, shape, tokens = REGISTERED[name]
    g = torch.Generator().manual_seed(0)
    if tokens:
        x = torch.randint(0, K, (8, *shape), generator=g)
        data = TensorData(x, torch.roll(x, -1, 1), x[:2], x[:2], K)
    else:
        dtype = torch.float64 if name in FLOAT64 else torch.float32
        data = TensorData(torch.randn(16, *shape, generator=g, dtype=dtype), torch.arange(16) % K,
                          torch.randn(2, *shape, generator=g, dtype=dtype), torch.arange(2), K)  # fmt: skip
    cfg = TrainConfig(optimizer="sgd", lr=0.01, momentum=0.9, batch_size=8, epochs=2)
    model_cfg = MODELS.get(name).config(**overrides)
    tolerance = FLOAT64_TOL if name in FLOAT64 else DEEP_TOL

    def member(condition):
        alpha = None if condition == "siddo" else 0.5
        objective = build_objective(condition, alpha, 2.0, K)
        model = build_model(model_cfg, shape, K, 0)
        return Member(model.double() if name in FLOAT64 else model, objective, 10)

    stack = [member("siddo"), member("rcd")]
    try:
        train_stacked(stack, data, cfg)
    except StackMismatch:  # refused: the masks of a dropout it cannot draw as alone
        assert random_draws(stack[0].model) and name in REFUSED
        assert _flat(stack[0].model).equal(_flat(member("siddo").model))  # untouched
        return
    assert name not in REFUSED
    for k, condition in enumerate(("siddo", "rcd")):
        alone = _alone(member(condition), data, cfg)
        torch.testing.assert_close(_flat(stack[k].model), _flat(alone.model), **tolerance)
        for a, b in zip(stack[k].model.buffers(), alone.model.buffers(), strict=True):
            torch.testing.assert_close(a, b, **tolerance)


class TransposedDropout(nn.Module):
    """Dropout on a transposed (non-contiguous) tensor: a stack cannot draw its masks as the
    model alone does."""

    def __init__(self):
        super().__init__()
        self.a, self.drop, self.b = nn.Linear(40, 16), nn.Dropout(0.3), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 40) -> (B, 10)
        h = self.a(x).view(-1, 4, 4).transpose(1, 2)  # (B, 4, 4), column-major in memory
        return self.b(self.drop(h).flatten(1))


def transposed_dropout(seed: int) -> nn.Module:
    return TransposedDropout()


def test_a_refused_stack_trains_its_runs_alone_with_a_warning(tmp_path):
    _REFUSED.clear()
    path = write_config(
        tmp_path, model={"name": "factory", "factory": f"{__name__}:transposed_dropout"}
    )
    cfg = load_config(path)
    with pytest.warns(UserWarning, match="trains otherwise than alone.*one at a time"):
        outcome = run_grid(cfg, tmp_path / "stacked", ExecutorConfig(stack=4), "cpu")
    assert outcome.completed == 7 and not outcome.failed
    run_grid(cfg, tmp_path / "seq", ExecutorConfig(), "cpu")
    assert_same_runs(expand(cfg), tmp_path / "stacked", tmp_path / "seq")  # bit for bit
    store = RunStore(tmp_path / "stacked")
    assert all(store.record(s.run_id)["engine"]["stack"] is None for s in expand(cfg).runs)
