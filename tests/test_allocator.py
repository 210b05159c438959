"""RankAllocator: budgets, schedules, skipped and non-finite steps, optimizer state, weight decay."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import get_peft_model
from torch import nn

from peft_geolora import GeoLoraConfig, RankAllocator

from .helpers import orthonormality_error


class TwoDense(nn.Module):
    """Two bias-free zero Linear layers: the adapters alone are the matrices being fitted."""

    def __init__(self, n: int = 24, m: int = 32) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(n, m, bias=False), nn.Linear(n, m, bias=False)
        nn.init.zeros_(self.a.weight)
        nn.init.zeros_(self.b.weight)

    def forward(self, x):
        return self.a(x), self.b(x)


def _low_rank(m: int, n: int, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    P = torch.linalg.qr(torch.randn(m, rank, generator=g))[0]
    Q = torch.linalg.qr(torch.randn(n, rank, generator=g))[0]
    return P @ torch.diag(torch.linspace(3.0, 1.0, rank)) @ Q.T


def _fit(model, targets, allocator, optimizer, steps: int, after_step=None) -> None:
    eye = torch.eye(24)
    for _ in range(steps):
        ya, yb = model(eye)
        loss = 0.5 * ((ya - targets[0].T).square().sum() + (yb - targets[1].T).square().sum())
        loss.backward()
        optimizer.step()
        allocator.step()
        optimizer.zero_grad()
        if after_step is not None:
            after_step()


def _two_layer_model(**config):
    config.setdefault("r", 4)
    if "lora_alpha" not in config:
        config.setdefault("scaling", 1.0)
    config.setdefault("max_rank", 8)
    torch.manual_seed(0)
    return get_peft_model(TwoDense(), GeoLoraConfig(target_modules=["a", "b"], **config))


@pytest.mark.parametrize("cycle_length", [0, 1])
def test_global_budget_matches_known_needs(cycle_length: int) -> None:
    """Targets of rank 6 and 2 under a budget of 8 singular values: the allocation matches the needs."""
    model = _two_layer_model(budget=8, cycle_length=cycle_length)
    targets = (_low_rank(32, 24, 6, 1), _low_rank(32, 24, 2, 2))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    allocator = RankAllocator(model, optimizer)
    totals = []

    def record() -> None:
        if cycle_length == 0 or allocator.num_steps % 2 == 0:  # right after a truncation
            totals.append(allocator.total_rank())

    _fit(model, targets, allocator, optimizer, steps=200, after_step=record)
    assert set(totals) == {8}
    assert allocator.ranks() == {"base_model.model.a": 6, "base_model.model.b": 2}


def test_parameter_budget_is_respected() -> None:
    model = _two_layer_model(budget=300, budget_unit="params", cycle_length=0)
    targets = (_low_rank(32, 24, 6, 1), _low_rank(32, 24, 2, 2))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    allocator = RankAllocator(model, optimizer)
    _fit(model, targets, allocator, optimizer, steps=30)
    assert allocator.num_adapter_parameters() <= 300
    assert allocator.num_adapter_parameters() > 300 - (32 + 24 + 2 * 8 + 1)  # no room for one more value


def test_budget_below_the_rank_floors_is_refused() -> None:
    model = _two_layer_model(budget=5, min_rank=3, r=3, cycle_length=0)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    with pytest.raises(ValueError, match=r"`budget` must be >= 6 singular values .* got 5"):
        RankAllocator(model, optimizer)
    with pytest.raises(ValueError, match=r"`budget` must be >= 354 parameters"):  # 2 * 3 * (32 + 24 + 3)
        RankAllocator(model, optimizer, budget=300, budget_unit="params")


def test_warmup_and_freeze_fix_the_ranks() -> None:
    model = _two_layer_model(cycle_length=0, warmup_steps=5, freeze_step=12, tau=0.01)
    targets = (_low_rank(32, 24, 6, 1), _low_rank(32, 24, 2, 2))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    allocator = RankAllocator(model, optimizer)
    seen = []
    _fit(model, targets, allocator, optimizer, steps=25, after_step=lambda: seen.append(allocator.total_rank()))
    assert seen[:5] == [8] * 5  # warm-up: initial ranks 4 + 4
    assert seen[12:] == [seen[11]] * len(seen[12:])  # frozen from step 12 on
    assert len(set(seen[5:12])) > 1 or seen[5] != 8  # ranks moved in between
    history = allocator.rank_history()
    assert all(step > 5 and step <= 12 for events in history.values() for step, _ in events)


@pytest.mark.parametrize(
    "settings",
    [
        {"cycle_length": 0, "step_rule": "coefficient"},
        {"cycle_length": 0, "step_rule": "optimizer"},
        # the non-finite step is an S-only step of a cycle (the 4th)
        {"step_rule": "optimizer"},
    ],
)
def test_non_finite_step_is_undone_bit_for_bit(settings: dict) -> None:
    step_rule = settings["step_rule"]
    model = _two_layer_model(**settings)
    targets = (_low_rank(32, 24, 6, 1), _low_rank(32, 24, 2, 2))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    allocator = RankAllocator(model, optimizer)
    _fit(model, targets, allocator, optimizer, steps=3)
    before = [p.detach().clone() for p in params]
    state_before = {i: {k: v.clone() for k, v in optimizer.state[p].items()} for i, p in enumerate(params)}
    allocator_before = allocator.state_dict()
    ranks_before = allocator.ranks()

    eye = torch.eye(24)
    ya, yb = model(eye)
    (ya.sum() + yb.sum()).backward()
    params[0].grad[0, 0] = float("nan")
    optimizer.step()
    with pytest.warns(UserWarning, match="non-finite"):
        allocator.step()
    optimizer.zero_grad()
    assert all(torch.equal(b, p) for b, p in zip(before, params))
    for i, p in enumerate(params):
        assert all(torch.equal(v, optimizer.state[p][k]) for k, v in state_before[i].items())
    assert allocator.ranks() == ranks_before
    if step_rule == "coefficient":
        saved, now = allocator_before["rule"], allocator.state_dict()["rule"]
        assert saved["num_steps"] == now["num_steps"]
        assert all(torch.equal(saved["tensors"][k], now["tensors"][k]) for k in saved["tensors"])
    _fit(model, targets, allocator, optimizer, steps=3)  # the run continues
    assert all(torch.isfinite(p).all() for p in params)


def _basis_flags(model) -> set[bool]:
    return {m.basis_gradients["default"] for m in model.modules() if hasattr(m, "basis_gradients")}


def test_skipping_the_basis_gradients_on_s_only_steps_changes_nothing() -> None:
    """The coefficient rule reads the K- and L-gradients only at a cycle's augmentation: the layers skip them on the
    other steps, and the run is bit for bit the one that computes them at every step."""

    def run(skip: bool) -> tuple[list[torch.Tensor], list[set[bool]]]:
        model = _two_layer_model(step_rule="coefficient")
        targets = (_low_rank(32, 24, 6, 1), _low_rank(32, 24, 2, 2))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        allocator = RankAllocator(model, optimizer)
        if not skip:
            allocator.rule.steps_bases = lambda schedule: True
            allocator._announce_next_step()
        flags = [_basis_flags(model)]
        _fit(model, targets, allocator, optimizer, steps=14, after_step=lambda: flags.append(_basis_flags(model)))
        return [p.detach().clone() for p in params], flags

    skipped, flags = run(skip=True)
    computed, always = run(skip=False)
    assert flags[:9] == [{True}, {False}, {False}, {False}, {True}, {False}, {False}, {False}, {True}]
    assert always == [{True}] * 15
    assert all(torch.equal(a, b) for a, b in zip(skipped, computed))


def test_the_optimizer_steps_the_bases_at_every_step() -> None:
    """Default rule: the optimizer steps U, S and V at every step (their Adam step counts agree), and the fit of a
    rank-6 and a rank-2 target recovers both ranks with orthonormal bases."""
    model = _two_layer_model(tau=0.1)
    targets = (_low_rank(32, 24, 6, 1), _low_rank(32, 24, 2, 2))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    allocator = RankAllocator(model, optimizer)
    _fit(model, targets, allocator, optimizer, steps=200)
    layer = model.base_model.model.a
    U, S = layer.geolora_U["default"], layer.geolora_S["default"]
    assert int(optimizer.state[S]["step"]) == int(optimizer.state[U]["step"]) == 200
    allocator.finish()
    assert allocator.ranks() == {"base_model.model.a": 6, "base_model.model.b": 2}
    error = torch.linalg.norm(layer.get_delta_weight("default") - targets[0]) / torch.linalg.norm(targets[0])
    assert error < 2e-2, float(error)
    assert orthonormality_error(U[:, :6]) < 1e-5


def test_step_skipped_by_the_grad_scaler_is_skipped() -> None:
    model = _two_layer_model(cycle_length=0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    allocator = RankAllocator(model, optimizer)
    scaler = torch.amp.GradScaler("cpu")
    eye = torch.eye(24)
    ya, yb = model(eye)
    scaler.scale(ya.sum() + yb.sum()).backward()
    params[0].grad[0, 0] = float("inf")
    before = [p.detach().clone() for p in params]
    scaler.step(optimizer)  # sees the inf and skips optimizer.step()
    scaler.update()
    allocator.step()
    assert allocator.num_steps == 0
    assert all(torch.equal(b, p) for b, p in zip(before, params))


def test_missing_allocator_warns_once_with_the_fix() -> None:
    import peft_geolora.layer as layer_module

    layer_module._warned_missing_allocator = False
    model = _two_layer_model()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    eye = torch.eye(24)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(8):
            ya, yb = model(eye)
            (ya.sum() + yb.sum()).backward()
            optimizer.step()
            optimizer.zero_grad()
    messages = [str(w.message) for w in caught if "rank-allocator" in str(w.message)]
    assert len(messages) == 1
    assert "RankAllocator(model, optimizer)" in messages[0] and "allocator.step()" in messages[0]


@pytest.mark.parametrize("step_rule", ["coefficient", "optimizer"])
def test_weight_decay_on_the_bases_keeps_them_orthonormal(step_rule: str) -> None:
    """The Trainer's AdamW decays U and V too: only the part of the move orthogonal to the bases counts."""
    model = _two_layer_model(cycle_length=0, step_rule=step_rule)
    targets = (_low_rank(32, 24, 6, 1), _low_rank(32, 24, 2, 2))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.5)
    allocator = RankAllocator(model, optimizer)
    _fit(model, targets, allocator, optimizer, steps=50)
    for name, module in model.named_modules():
        if hasattr(module, "geolora_U"):
            U, _, V = module.active_factors("default")
            assert orthonormality_error(U.detach()) < 1e-5 and orthonormality_error(V.detach()) < 1e-5


def test_coefficient_rule_leaves_the_factors_out_of_the_optimizer() -> None:
    """The optimizer steps the rest of the model and keeps no state for U, S, V; their grads are consumed."""
    model = _two_layer_model(cycle_length=2, step_rule="coefficient")
    head = nn.Parameter(torch.ones(3))
    factors = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([*factors, head], lr=1e-2, weight_decay=0.1)
    allocator = RankAllocator(model, optimizer)
    targets = (_low_rank(32, 24, 6, 1), _low_rank(32, 24, 2, 2))
    _fit(model, targets, allocator, optimizer, steps=7)
    assert all(p not in optimizer.state for p in factors)
    head.grad = torch.ones(3)
    optimizer.step()  # the optimizer still steps what is not an adapter factor
    allocator.step()
    assert head.detach().lt(1).all() and head in optimizer.state
    assert allocator.state_dict()["rule"]["num_steps"] == 8


def test_coefficient_moment_follows_the_truncation() -> None:
    """The first moment, seen as the matrix Û M V̂ᵀ, is carried exactly onto the kept directions (projected)."""
    model = _two_layer_model(cycle_length=3, tau=0.2, max_rank=4, step_rule="coefficient")
    targets = (_low_rank(32, 24, 6, 1), _low_rank(32, 24, 2, 2))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    allocator = RankAllocator(model, optimizer)
    _fit(model, targets, allocator, optimizer, steps=6)  # mid-cycle: augmented, not yet truncated
    assert allocator.is_augmented()
    layer = model.base_model.model.a
    index = [a.layer for a in allocator.adapters].index(layer)
    state = allocator.rule.state
    r = layer.rank["default"]
    U, _, V = (t.detach().clone() for t in layer.active_factors("default"))
    before = U @ state.exp_avg[index][:r, :r] @ V.T  # (m, n)
    allocator.finish()
    r1 = layer.rank["default"]
    U1, _, V1 = (t.detach() for t in layer.active_factors("default"))
    after = U1 @ state.exp_avg[index][:r1, :r1] @ V1.T
    torch.testing.assert_close(after, U1 @ U1.T @ before @ V1 @ V1.T, atol=1e-6, rtol=1e-5)
    assert state.exp_avg[index][r1:, :].abs().max() == 0 and state.exp_avg[index][:, r1:].abs().max() == 0


def test_optimizer_state_follows_the_rotation() -> None:
    """step_rule="optimizer": momentum of S, seen as the matrix U m_S Vᵀ, is carried into the new bases."""
    model = _two_layer_model(cycle_length=0, tau=0.0, step_rule="optimizer")
    targets = (_low_rank(32, 24, 6, 1), _low_rank(32, 24, 2, 2))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    allocator = RankAllocator(model, optimizer)
    _fit(model, targets, allocator, optimizer, steps=3)
    layer = model.base_model.model.a
    U, S, V = layer.geolora_U["default"], layer.geolora_S["default"], layer.geolora_V["default"]

    eye = torch.eye(24)
    ya, yb = model(eye)
    (0.5 * ((ya - targets[0].T).square().sum() + (yb - targets[1].T).square().sum())).backward()
    U0, V0 = U.detach().clone(), V.detach().clone()
    optimizer.step()
    momentum_before = U0 @ optimizer.state[S]["momentum_buffer"] @ V0.T  # (m, n) in the old bases
    allocator.step()
    optimizer.zero_grad()
    r = layer.rank["default"]
    U1, V1 = U[:, :r].detach(), V[:, :r].detach()
    momentum_after = U @ optimizer.state[S]["momentum_buffer"] @ V.T
    expected = U1 @ U1.T @ momentum_before @ V1 @ V1.T
    torch.testing.assert_close(momentum_after.detach(), expected, atol=1e-5, rtol=1e-4)
    for key in ("momentum_buffer",):
        for p in (U, S, V):
            state = optimizer.state[p][key]
            assert torch.all(state[..., r:] == 0)  # inactive capacity (if any) stays zero in the state too


def test_bad_optimizer_and_model_are_refused() -> None:
    model = _two_layer_model()
    with pytest.raises(ValueError, match="does not update the GeoLoRA factors"):
        RankAllocator(model, torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1))
    with pytest.raises(TypeError, match="PeftModel"):
        RankAllocator(nn.Linear(2, 2), torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1))
    with pytest.raises(TypeError, match="Unknown RankAllocator option"):
        RankAllocator(model, torch.optim.SGD(model.parameters(), lr=0.1), tua=0.1)
    with pytest.raises(ValueError, match="`tau` must be"):
        RankAllocator(model, torch.optim.SGD(model.parameters(), lr=0.1), tau=1.5)


def test_update_and_allocate_steps_the_attached_allocator() -> None:
    model = _two_layer_model()
    with pytest.raises(RuntimeError, match="No GeoLoRA rank allocator"):
        model.base_model.update_and_allocate(0)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    allocator = RankAllocator(model, optimizer)
    ya, yb = model(torch.eye(24))
    (ya.sum() + yb.sum()).backward()
    optimizer.step()
    model.base_model.update_and_allocate(0)
    assert allocator.num_steps == 1


def test_finish_closes_an_open_cycle_and_history_keeps_only_kept_ranks() -> None:
    model = _two_layer_model(cycle_length=3, max_rank=4)
    targets = (_low_rank(32, 24, 6, 1), _low_rank(32, 24, 2, 2))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    allocator = RankAllocator(model, optimizer)
    _fit(model, targets, allocator, optimizer, steps=9)  # step 9 opens a cycle: the bases are augmented
    kept = allocator.total_rank(kept=True)
    assert allocator.is_augmented() and allocator.total_rank() > kept  # into the storage's free columns
    assert all(r <= 4 for r in allocator.ranks().values())  # the storage holds max_rank columns
    allocator.finish()
    assert not allocator.is_augmented() and allocator.total_rank() <= 8
    assert all(r <= 4 for r in allocator.ranks().values())
    assert all(rank <= 4 for events in allocator.rank_history().values() for _, rank in events)
    for module in model.modules():
        if hasattr(module, "geolora_S"):
            S = module.active_factors("default")[1].detach()
            assert torch.equal(S, torch.diag(torch.diagonal(S)))  # truncated: diagonal again


def test_new_coefficients_start_at_the_layers_mean_second_moment() -> None:
    """Default rule: at an augmentation the optimizer's second moments of the new coefficients start at the mean of
    the kept block, not at zero (a zero would make Adam's first step of each ±lr whatever its gradient)."""
    model = _two_layer_model(cycle_length=2)
    factors = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(factors, lr=1e-2, weight_decay=0.1)
    allocator = RankAllocator(model, optimizer)
    targets = (_low_rank(32, 24, 6, 1), _low_rank(32, 24, 2, 2))
    _fit(model, targets, allocator, optimizer, steps=4)  # the first step of the second cycle: just augmented
    assert allocator.is_augmented()
    layer = model.base_model.model.a
    for S in [layer.geolora_S["default"]]:
        square = optimizer.state[S]["exp_avg_sq"]
        kept = next(k for name, k in allocator.ranks(kept=True).items() if name.endswith(".a"))
        r = layer.rank["default"]
        assert r > kept
        # the new rows and columns started at the kept block's mean and have taken no step yet
        mean = square[:kept, :kept].mean()
        torch.testing.assert_close(square[kept:r, :r], mean.expand(r - kept, r))
        assert orthonormality_error(layer.active_factors("default")[0].detach()) < 1e-6


def test_default_rule_resumes_mid_cycle_exactly() -> None:
    """Model, optimizer and allocator state taken in the middle of a cycle continue exactly (cycle start included)."""
    targets = (_low_rank(32, 24, 6, 1), _low_rank(32, 24, 2, 2))

    def build():
        model = _two_layer_model(cycle_length=3, tau=0.2)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
        return model, optimizer, RankAllocator(model, optimizer)

    model, optimizer, allocator = build()
    _fit(model, targets, allocator, optimizer, steps=10)
    assert allocator.is_augmented()
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict(), allocator.state_dict()))
    _fit(model, targets, allocator, optimizer, steps=10)
    model2, optimizer2, allocator2 = build()
    model2.load_state_dict(saved[0])  # the rank buffers come with it
    optimizer2.load_state_dict(saved[1])
    allocator2.load_state_dict(saved[2])
    restored = allocator2.state_dict()["rule"]["tensors"]
    assert all(torch.equal(v, restored[k]) for k, v in saved[2]["rule"]["tensors"].items())
    _fit(model2, targets, allocator2, optimizer2, steps=10)
    assert allocator2.ranks() == allocator.ranks() and allocator2.rank_history() == allocator.rank_history()
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name


def test_pad_state_seeds_the_new_directions() -> None:
    """Augmentation from rank r: first moments of the new entries start at zero, second moments at the mean of the
    established ones: per row of U and V, over S's active block."""
    from peft_geolora import optimizer_state

    torch.manual_seed(0)
    U, S, V = (nn.Parameter(torch.zeros(shape)) for shape in ((6, 4), (4, 4), (5, 4)))
    optimizer = torch.optim.Adam([U, S, V])
    for p in (U, S, V):
        optimizer.state[p] = {
            "step": torch.tensor(3.0),
            "exp_avg": torch.randn(p.shape),
            "exp_avg_sq": torch.rand(p.shape),
        }
    before = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in (U, S, V)}
    optimizer_state.pad_state(optimizer, U, S, V, 2)
    for p in (U, V):
        old, new = before[id(p)], optimizer.state[p]
        assert torch.equal(new["exp_avg"][:, :2], old["exp_avg"][:, :2]) and new["exp_avg"][:, 2:].abs().max() == 0
        expected = old["exp_avg_sq"][:, :2].mean(1, keepdim=True).expand(-1, 2)
        torch.testing.assert_close(new["exp_avg_sq"][:, 2:], expected)
    old, new = before[id(S)], optimizer.state[S]
    assert torch.equal(new["exp_avg_sq"][:2, :2], old["exp_avg_sq"][:2, :2])
    fill = old["exp_avg_sq"][:2, :2].mean()
    assert torch.all(new["exp_avg_sq"][2:, :] == fill) and torch.all(new["exp_avg_sq"][:, 2:] == fill)
    assert new["exp_avg"][2:, :].abs().max() == 0 and new["exp_avg"][:, 2:].abs().max() == 0


def test_rotate_states_matches_the_dense_maps_per_adapter():
    """Truncation of a batch of adapters (ranks 2 and 3 of k = 4, capacity 5): each adapter's state equals the
    dense maps of its own P, Q (first moments linear, second moments through the squared maps), zero beyond r₁;
    a state the maps do not cover is reset with a warning."""
    from peft_geolora import optimizer_state

    torch.manual_seed(0)
    k, capacity, ranks = 4, 5, [2, 3]
    factors = [tuple(nn.Parameter(torch.zeros(shape)) for shape in ((6, 5), (5, 5), (7, 5))) for _ in ranks]
    optimizer = torch.optim.Adam([p for f in factors for p in f])
    for params in factors:
        for p in params:
            optimizer.state[p] = {
                "step": torch.tensor(3.0),
                "exp_avg": torch.randn(p.shape),
                "exp_avg_sq": torch.rand(p.shape),
                "other": torch.randn(p.shape),
            }
    before = {id(p): {key: v.clone() for key, v in optimizer.state[p].items()} for f in factors for p in f}
    P = torch.linalg.qr(torch.randn(2, k, k, dtype=torch.float64))[0]
    Q = torch.linalg.qr(torch.randn(2, k, k, dtype=torch.float64))[0]
    warnings = []
    optimizer_state.rotate_states(optimizer, factors, P, Q, ranks, lambda key, msg: warnings.append(key))
    for b, ((U, S, V), r1) in enumerate(zip(factors, ranks)):
        for key, square in (("exp_avg", False), ("exp_avg_sq", True)):
            p_map, q_map = (P[b].square(), Q[b].square()) if square else (P[b], Q[b])
            p_map, q_map = p_map[:, :r1], q_map[:, :r1]
            expected = {
                id(S): p_map.T @ before[id(S)][key][:k, :k].double() @ q_map,
                id(U): before[id(U)][key][:, :k].double() @ q_map,
                id(V): before[id(V)][key][:, :k].double() @ p_map,
            }
            for p in (U, S, V):
                new = optimizer.state[p][key]
                torch.testing.assert_close(new[:, :r1][: r1 if p is S else None].double(), expected[id(p)])
                assert new[:, r1:].abs().max() == 0 and (p is not S or new[r1:].abs().max() == 0)
            assert new.shape[-1] == capacity
        assert all(optimizer.state[p]["other"].abs().max() == 0 for p in (U, S, V))
        assert all(torch.equal(optimizer.state[p]["step"], before[id(p)]["step"]) for p in (U, S, V))
    assert warnings == ["state:other"] * 3


@pytest.mark.parametrize("step_rule", ["coefficient", "optimizer"])
def test_every_rule_under_plain_sgd_is_the_projected_gradient_step(step_rule: str) -> None:
    """With SGD (no momentum) and augment + truncate every step, keeping every value, both rules take Algorithm
    1's step: ``W ← W − λ P_T(G)`` with ``P_T(G) = U Uᵀ G + G V Vᵀ − U Uᵀ G V Vᵀ`` (fp64, to 1e-10)."""
    from .helpers import adapter_matrix, geolora_dense

    torch.manual_seed(0)
    m, n, r, lr = 12, 9, 3, 0.1
    model, layer = geolora_dense(
        m,
        n,
        torch.float64,
        r=r,
        max_rank=6,
        tau=0.0,
        cycle_length=0,
        step_rule=step_rule,
    )
    with torch.no_grad():  # bases orthonormal in fp64 (they are initialised in fp32), a full S
        for factor in (layer.geolora_U["default"], layer.geolora_V["default"]):
            factor[:, :r] = torch.linalg.qr(factor[:, :r])[0]
        layer.geolora_S["default"][:r, :r] = torch.randn(r, r, dtype=torch.float64)
    A = torch.randn(m, n, dtype=torch.float64)
    U, _, V = (t.detach().clone() for t in layer.active_factors("default"))
    W = adapter_matrix(layer)
    G = W - A  # the gradient of ½ ‖W − A‖² with respect to W
    expected = W - lr * (U @ U.T @ G + G @ V @ V.T - U @ U.T @ G @ V @ V.T)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    allocator = RankAllocator(model, optimizer)
    (0.5 * (model(torch.eye(n, dtype=torch.float64)) - A.T).square().sum()).backward()
    optimizer.step()
    allocator.step()
    torch.testing.assert_close(adapter_matrix(layer), expected, atol=1e-10, rtol=0)
    assert layer.rank["default"] == 2 * r  # both sides gained r new directions, and tau = 0 keeps them


@pytest.mark.parametrize(
    "optimizer_class, options",
    [
        (torch.optim.Adam, {}),
        (torch.optim.AdamW, {"weight_decay": 0.1}),
        (torch.optim.SGD, {"momentum": 0.9}),
    ],
)
def test_relative_step_scales_s_step_by_the_adapter_size(optimizer_class, options, monkeypatch) -> None:
    """The relative step above ρ (``optimizer_rule.RELATIVE_STEP_ABOVE``, here 0.5, against none: ρ = ρ_max = 1e9):
    after an Adam-family step, the kept block of S is ``d S₀ + g (S⁺ − d S₀)`` with ``g = ‖s S₀‖_F / ρ`` (below the
    ceiling ρ_max = 10) and ``d = 1 − lr · wd`` for AdamW's decoupled decay (the decay itself is not scaled); the
    bases' moves are untouched; an SGD step (already proportional to the gradient) is left exactly as it was."""
    from peft_geolora import optimizer_rule

    from .helpers import geolora_dense

    m, n, r, lr, rho, s = 12, 9, 3, 1e-2, 0.5, 0.8
    results = []
    for relative, ceiling in ((1e9, 1e9), (rho, optimizer_rule.RELATIVE_STEP_UP_TO)):
        monkeypatch.setattr(optimizer_rule, "RELATIVE_STEP_ABOVE", relative)
        monkeypatch.setattr(optimizer_rule, "RELATIVE_STEP_UP_TO", ceiling)
        torch.manual_seed(0)
        model, layer = geolora_dense(m, n, torch.float64, r=r, max_rank=6, tau=0.0, scaling=s)
        with torch.no_grad():
            layer.geolora_S["default"][:r, :r] = 2 * torch.randn(r, r, dtype=torch.float64)
        S_before = layer.geolora_S["default"][:r, :r].detach().clone()
        optimizer = optimizer_class([p for p in model.parameters() if p.requires_grad], lr=lr, **options)
        allocator = RankAllocator(model, optimizer)
        (model(torch.randn(4, n, dtype=torch.float64)) ** 2).sum().backward()
        optimizer.step()
        allocator.step()  # the first step of a cycle: augmented, not truncated
        assert allocator.is_augmented()
        results.append([t.detach().clone() for t in layer.active_factors("default")])
    (U0, S0, V0), (U1, S1, V1) = results
    torch.testing.assert_close(U1, U0, atol=1e-12, rtol=0)
    torch.testing.assert_close(V1, V0, atol=1e-12, rtol=0)
    if optimizer_class is torch.optim.SGD:
        assert torch.equal(S1, S0)
        return
    gain = float(torch.linalg.matrix_norm(s * S_before)) / rho
    kept = 1 - lr * options.get("weight_decay", 0.0) if optimizer_class is torch.optim.AdamW else 1.0
    assert gain > 5
    expected = kept * S_before + gain * (S0[:r, :r] - kept * S_before)
    torch.testing.assert_close(S1[:r, :r], expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("make", [lambda ps: torch.optim.AdamW(ps, lr=3e-2), lambda ps: torch.optim.SGD(ps, lr=0.5)])
def test_a_full_adapter_rotates_toward_the_gradient(make) -> None:
    """A pinned rank (min_rank = max_rank = r) fills the storage, so an augmentation has no free column: the adapter
    then keeps the leading r directions of its augmentation at once, and its bases follow the gradient (before 0.3.0's
    storage of max_rank columns they could not move at all: the error stayed at 0.997)."""
    model = _two_layer_model(cycle_length=3, r=2, min_rank=2, max_rank=2)
    targets = (_low_rank(32, 24, 2, 1), _low_rank(32, 24, 2, 2))
    optimizer = make([p for p in model.parameters() if p.requires_grad])
    allocator = RankAllocator(model, optimizer)
    _fit(model, targets, allocator, optimizer, steps=160)
    allocator.finish()
    assert allocator.ranks() == {"base_model.model.a": 2, "base_model.model.b": 2}
    for layer, target in zip((model.base_model.model.a, model.base_model.model.b), targets):
        delta = layer.get_delta_weight("default").detach()
        assert torch.linalg.norm(delta - target) / torch.linalg.norm(target) < 0.1  # (measured: 0.04 AdamW, 1e-7 SGD)
