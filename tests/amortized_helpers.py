"""Broken amortized attacks for the harness's checks (module-level: the worker imports them by reference)."""
from __future__ import annotations

import torch

import spdbench


class _Scale(torch.nn.Module):
    def __init__(self, n: int = 3) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((n,), 0.5))

    def forward(self, x):
        return torch.tanh(self.w.view(1, -1, 1, 1) * (x - 0.5))


class PeeksAtTarget(spdbench.AmortizedAttack):
    """Runs the target's encoder inside apply(): not feed-forward, refused."""

    def build_network(self):
        return _Scale()

    def fit(self, train_images, target, budget, generator=None):
        self._target = target
        return self.build_network()

    def apply(self, images, budget):
        self._target.encode(images)
        return budget.eps * self.network(images)


class HugeNetwork(spdbench.AmortizedAttack):
    """Returns a network over the size an amortized attack may send back."""

    max_network_params = 10

    def build_network(self):
        return _Scale(64)

    def fit(self, train_images, target, budget, generator=None):
        return self.build_network()


class NotAModule(spdbench.AmortizedAttack):
    """fit() returns a tensor instead of the trained network."""

    def fit(self, train_images, target, budget, generator=None):
        return torch.zeros(3)
