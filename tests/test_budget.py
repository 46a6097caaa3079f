import math

import pytest
import torch

from spdbench import Budget, BudgetError, apply_budget, format_eps, parse_eps
from spdbench.budget import clamp_to_image, quantize_8bit
from spdbench.data import load_photos
from spdbench.optim import optimize


@pytest.mark.parametrize("text,value", [("16/255", 16 / 255), ("4/255", 4 / 255), (0.03, 0.03), ("0.5", 0.5)])
def test_parse_eps(text, value):
    assert parse_eps(text) == pytest.approx(value)


@pytest.mark.parametrize("bad,needle", [(-0.1, "> 0"), (0, "> 0"), ("16", "16/255"), (16, "16/255"),
                                        ("abc", "not a number"), (float("nan"), "finite"), ("1/0", "not a number")])
def test_bad_eps_names_the_problem(bad, needle):
    with pytest.raises(BudgetError, match=needle):
        Budget("linf", bad)


def test_unknown_norm():
    with pytest.raises(BudgetError, match="unknown norm 'l1'"):
        Budget("l1", "4/255")


def test_eps_prints_as_fraction():
    assert format_eps(16 / 255) == "16/255"
    assert str(Budget("l2", "8/255")) == "l2:8/255"
    assert Budget(eps="16/255") == Budget(eps=16 / 255)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("eps", ["4/255", "16/255", 0.5])
def test_projection_respects_budget_and_range(norm, eps):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 16, 16, generator=g)
    delta = torch.randn(5, 3, 16, 16, generator=g) * 3
    budget = Budget(norm, eps)
    projected = clamp_to_image(x, budget.project(delta))
    assert (budget.norms(projected) <= budget.eps + 1e-6).all()
    adv = x + projected
    assert adv.min() >= 0 and adv.max() <= 1
    # a delta already inside the ball is left alone
    small = budget.project(delta) * 0.5
    assert torch.allclose(budget.project(small), small)


@pytest.mark.parametrize("norm,eps", [("linf", "4/255"), ("linf", 0.03), ("l2", "255/255"), ("l2", 0.1)])
def test_apply_budget_quantizes_inside_budget(norm, eps):
    x = load_photos(n=2, size=32)
    budget = Budget(norm, eps)
    delta = torch.randn_like(x, generator=None) * 0.2
    adv = apply_budget(x, delta, budget)
    assert torch.equal(adv, quantize_8bit(adv)), "protected image must be on the 8-bit grid"
    assert (budget.norms(adv - x) <= budget.eps + 1e-6).all()
    assert adv.min() >= 0 and adv.max() <= 1


def test_random_delta_inside_ball():
    for norm in ("linf", "l2"):
        b = Budget(norm, "8/255")
        d = b.random(torch.zeros(4, 3, 8, 8), torch.Generator().manual_seed(1))
        assert (b.norms(d) <= b.eps + 1e-6).all() and d.abs().sum() > 0


@pytest.mark.parametrize("optimizer", ["pgd", "adam"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_optimizers_decrease_convex_loss_and_stay_in_ball(optimizer, norm):
    target = torch.full((2, 3, 8, 8), 0.02)
    budget = Budget(norm, "4/255" if norm == "linf" else 0.3)
    res = optimize(lambda d: ((d - target) ** 2).sum(), torch.zeros(2, 3, 8, 8), budget,
                   steps=30, step_size=0.002 if norm == "linf" else 0.02, optimizer=optimizer)
    assert res.losses[-1] < res.losses[0] * 0.6
    assert len(res.losses) == 30
    assert (budget.norms(res.delta) <= budget.eps + 1e-6).all()


def test_optimizer_maximizes():
    budget = Budget("linf", "8/255")
    res = optimize(lambda d: d.sum(), torch.zeros(1, 3, 4, 4), budget, steps=5, step_size=1 / 255, maximize=True)
    assert res.losses[-1] > res.losses[0]
    assert math.isclose(float(res.delta.max()), 5 / 255, rel_tol=1e-5)


def test_linear_schedule_is_photoguards():
    from spdbench.optim import step_size_at

    assert step_size_at(0, 100, 0.02, "linear") == pytest.approx(0.02)
    assert step_size_at(50, 100, 0.02, "linear") == pytest.approx(0.02 * (1 - 0.99 * 0.5))
