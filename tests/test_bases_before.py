"""The bases before an optimizer step: recovered from torch Adam's state (no copy held) or copied, with the same result."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peft_geolora import RankAllocator, bases_before

from .test_allocator import _fit, _low_rank, _two_layer_model


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.AdamW(ps, lr=3e-2, weight_decay=0.1),  # decoupled decay
        lambda ps: torch.optim.Adam(ps, lr=3e-2, weight_decay=0.1),  # decay added to the gradient
        lambda ps: torch.optim.Adam(ps, lr=1e-3, betas=(0.8, 0.9), eps=1e-6, foreach=False),
    ],
)
def test_the_inverted_step_gives_back_the_parameter_before_the_step(make) -> None:
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(20, 6) / 5)
    optimizer = make([p])
    undo = bases_before.bases_before_for(optimizer, [p])
    assert isinstance(undo, bases_before.InvertedAdamStep) and undo.held_tensors() == []
    for _ in range(6):
        p.grad = torch.randn_like(p)
        before = p.detach()[:, :4].clone()
        undo.record([p[:, :4]])
        optimizer.step()
        assert not torch.allclose(p[:, :4], before, atol=1e-4)  # it moved
        (recovered,) = undo.before([0], [p.detach()[:, :4]])
        torch.testing.assert_close(recovered, before, rtol=0, atol=2e-7)


def test_other_optimizers_and_factors_are_copied() -> None:
    p = nn.Parameter(torch.randn(8, 2))
    assert isinstance(bases_before.bases_before_for(torch.optim.SGD([p], lr=0.1), [p]), bases_before.CopiedBases)
    amsgrad = torch.optim.AdamW([p], amsgrad=True)
    assert isinstance(bases_before.bases_before_for(amsgrad, [p]), bases_before.CopiedBases)
    maximize = torch.optim.Adam([p], maximize=True)
    assert isinstance(bases_before.bases_before_for(maximize, [p]), bases_before.CopiedBases)
    half = nn.Parameter(torch.randn(8, 2, dtype=torch.bfloat16))
    assert isinstance(bases_before.bases_before_for(torch.optim.AdamW([half]), [half]), bases_before.CopiedBases)

    class MyAdam(torch.optim.AdamW):  # a subclass may step differently
        pass

    assert isinstance(bases_before.bases_before_for(MyAdam([p]), [p]), bases_before.CopiedBases)


def test_the_allocator_trains_the_same_adapters_without_holding_the_bases(monkeypatch) -> None:
    """AdamW under the default step: the recovered bases give the ranks and the fit the copied ones give, and the
    allocator holds no copy of the bases.

    Not bit for bit: the bases come back to about 1e-8, and an augmentation's new directions where the move is nearly
    inside the basis (here: layer b, whose target has rank 2, at its first augmentation) are as arbitrary as that
    rounding, in both runs alike; they carry next to nothing of ΔW, but later steps build on them.
    """
    targets = (_low_rank(32, 24, 6, 1), _low_rank(32, 24, 2, 2))

    def train():
        model = _two_layer_model(cycle_length=3)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2, weight_decay=0.01)
        allocator = RankAllocator(model, optimizer)
        _fit(model, targets, allocator, optimizer, steps=24)
        layers = [model.base_model.model.a, model.base_model.model.b]
        return [layer.get_delta_weight("default").detach() for layer in layers], allocator

    recovered, allocator = train()
    held = sum(t.numel() for t in allocator.rule.held_tensors())
    assert held == 2 * 2 * 8 * 8  # per layer: S before the step and the cycle's start (8 x 8 each), no basis
    monkeypatch.setattr(bases_before, "bases_before_for", lambda optimizer, params: bases_before.CopiedBases())
    copied, allocator_copied = train()
    assert allocator.ranks() == allocator_copied.ranks()
    for delta, other, target in zip(recovered, copied, targets):
        error, other_error = (torch.linalg.norm(d - target) / torch.linalg.norm(target) for d in (delta, other))
        assert abs(error - other_error) < 0.01  # (measured: 0 and 0.002 of errors 0.76 and 0.72)
        assert torch.linalg.norm(delta - other) / torch.linalg.norm(target) < 0.05  # (measured: 2e-7 and 0.03)
