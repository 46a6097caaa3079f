"""The amortized attack kind (issue 23): fit once on the train split in the worker, apply feed-forward,
network stored as safetensors and reloadable; the harness refuses what breaks the kind's rules."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

import spdbench
from amortized_helpers import HugeNetwork, NotAModule, PeeksAtTarget
from harness_helpers import fast_images, fast_suite
from spdbench import Budget
from spdbench.network_file import load_network, rebuild
from spdbench.results import Split, Status


@pytest.fixture(scope="module")
def amortized_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("amortized")
    images = fast_images(6)
    attack = spdbench.get_attack("amortized-encoder", steps=3, width=8, batch_size=2)
    return out, images, spdbench.run(attack, suite=fast_suite(), out=out, target="tiny-random", images=images)


def test_a_run_records_fit_and_apply_costs_and_the_network(amortized_run):
    out, _, res = amortized_run
    assert res.records and all(r.status == Status.ok for r in res.records), [r.error for r in res.records]
    for r in res.records:
        assert r.amortized and not r.universal
        assert r.timing.fit_wall_s is not None and r.timing.fit_wall_s > 0
        assert 0 < r.timing.per_image_s < r.timing.fit_wall_s
        assert r.model_calls.get("vae_encoder_fwd", 0) > 0, "the fit's model passes are counted"
        assert len(r.loss_curve) == 3
        net = r.network
        path = Path(out) / net["file"]
        assert path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == net["sha256"]
        assert net["values"] == sum(p.numel() for p in spdbench.get_attack("amortized-encoder", width=8)
                                    .build_network().state_dict().values())


def test_the_stored_network_reproduces_the_stored_protection(amortized_run):
    """verify's route: rebuild the network from the record's params, load the weights, apply again."""
    out, images, res = amortized_run
    from spdbench.harness import load_protection

    rec = next(r for r in res.records if r.split == Split.test)
    attack = rebuild(spdbench.get_attack("amortized-encoder", **rec.attack_params), Path(out) / rec.network["file"],
                     rec.network["sha256"])
    idx = [i for i, n in enumerate(res.records[0].image_names + res.records[-1].image_names)]
    stored = load_protection(Path(out) / rec.perturbation_file, images)
    budget = Budget(rec.norm, rec.eps)
    with torch.no_grad():
        again = spdbench.apply_budget(images, attack.apply(images, budget), budget)
    assert torch.equal(again, stored), float((again - stored).abs().max())
    assert idx  # both splits' photos are in the one perturbation file


def test_a_tampered_network_file_is_refused(amortized_run, tmp_path):
    out, _, res = amortized_run
    rec = res.records[0]
    src = Path(out) / rec.network["file"]
    bad = tmp_path / "net.safetensors"
    data = bytearray(src.read_bytes())
    data[-1] ^= 1
    bad.write_bytes(bytes(data))
    with pytest.raises(spdbench.RecordError, match="sha256"):
        load_network(bad, rec.network["sha256"])
    with pytest.raises(spdbench.RecordError, match="was fit by"):
        rebuild(spdbench.get_attack("amortized-pca-minus", width=8), src)


@pytest.mark.parametrize("cls, message", [
    (PeeksAtTarget, "apply\\(\\) ran the target"),
    (HugeNetwork, "more than the 10 an amortized attack may return"),
    (NotAModule, "fit\\(\\) returned Tensor"),
])
def test_the_kinds_rules_are_enforced_in_the_worker(cls, message, tmp_path):
    res = spdbench.run(cls(), suite=fast_suite(), out=tmp_path, target="tiny-random", images=fast_images(4))
    assert res.records and all(r.status == Status.error for r in res.records)
    assert all(r.error and __import__("re").search(message, r.error) for r in res.records), res.records[0].error


def test_an_untrained_network_is_flagged_zero_delta(tmp_path):
    """The network's last layer starts at zero: with no fit steps it protects nothing -- flagged, never ok."""
    attack = spdbench.get_attack("amortized-encoder", steps=1, width=8, lr=0.0)
    res = spdbench.run(attack, suite=fast_suite(), out=tmp_path, target="tiny-random", images=fast_images(4))
    assert all("zero-delta" in r.flags for r in res.records)
