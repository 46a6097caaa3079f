"""Seconds per iteration of every registered optimizing attack on the tiny target (CPU), and on
the SD1.5 architecture at 512x512 in fp16 when a GPU is present (random weights)."""
import pytest
import torch

import spdbench

STEPS = 5


def _attacks():
    out = []
    for name in spdbench.list_attacks():
        cls = spdbench.attacks.attack_class(name)
        if "steps" in cls.defaults:
            out.append(name)
    return out


@pytest.mark.parametrize("name", _attacks())
def test_attack_step_tiny_cpu(benchmark, name):
    target = spdbench.load_target("tiny")
    x = spdbench.load_photos(n=4, size=128)
    budget = spdbench.Budget("linf", "16/255")
    attack = spdbench.get_attack(name, steps=STEPS)
    benchmark.group = "attack step, tiny, 4 x 128px, CPU"
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    if attack.universal:
        benchmark.pedantic(lambda: attack.fit(x, target, budget, gen()), rounds=3, iterations=1, warmup_rounds=1)
    else:
        benchmark.pedantic(lambda: attack(x, target, budget, gen()), rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["seconds_per_iteration"] = benchmark.stats.stats.median / STEPS


@pytest.fixture(scope="module")
def sd15_random():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (SD1.5 architecture at 512 px)")
    from spdbench.targets.sd15_arch import build_sd15_random

    return build_sd15_random(device="cuda", dtype=torch.float16)


@pytest.mark.parametrize("name", _attacks())
def test_attack_step_sd15_gpu(benchmark, sd15_random, name):
    x = spdbench.load_photos(n=1, size=512).cuda()
    budget = spdbench.Budget("linf", "16/255")
    attack = spdbench.get_attack(name, steps=STEPS)
    benchmark.group = "attack step, SD1.5 arch fp16, 1 x 512px, GPU"

    def once():
        gen = torch.Generator(device="cuda").manual_seed(0)
        out = attack.fit(x, sd15_random, budget, gen) if attack.universal else attack(x, sd15_random, budget, gen)
        torch.cuda.synchronize()
        return out

    benchmark.pedantic(once, rounds=2, iterations=1, warmup_rounds=1)
    benchmark.extra_info["seconds_per_iteration"] = benchmark.stats.stats.median / STEPS
    benchmark.extra_info["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
