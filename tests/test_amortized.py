"""The amortized attack kind (issue 23): fit once on the train split in the worker, apply feed-forward,
network stored as safetensors and reloadable; the harness refuses what breaks the kind's rules."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

import spdbench
from amortized_helpers import HugeNetwork, NotAModule, PeeksAtTarget
from entry_helpers import suite_registered  # noqa: F401 (fixture)
from harness_helpers import fast_images, fast_suite
from spdbench import Budget
from spdbench.store.networks import load_network, rebuild
from spdbench.store.records import Split, Status
from spdbench.verify.submit import submit, verify


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
    from spdbench.harness.pipeline import load_protection

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


# --- verify and submit: the stored network is re-applied, the fit re-run ------------------------
@pytest.fixture(scope="module")
def amortized_folder(tmp_path_factory, suite_registered):
    """A real amortized run on the registered fast suite (verify needs a registered suite)."""
    out = tmp_path_factory.mktemp("amortized-verify") / "run"
    res = spdbench.run("amortized-encoder", suite="test-fast", out=out, attack_params={"width": 8, "batch_size": 2})
    assert res.ok and len(res.records) == 4, [r.error for r in res.records]
    return out


def _records(folder: Path) -> list[Path]:
    return sorted((folder / "records").glob("*.json"))


def _edit_network(folder: Path, fn, config=None) -> None:
    """Rewrite every network file with fn(state) and every record's network entry to match it (a
    submitter who swaps in another network, consistently)."""
    import json

    from spdbench.store.networks import save_network

    for rec_path in _records(folder):
        data = json.loads(rec_path.read_text())
        net = data["network"]
        path = folder / net["file"]
        if not path.with_suffix(".done").exists():
            state, meta = load_network(path)
            info = save_network(folder, net["file"], meta["attack"], config or meta["config"], fn(state),
                                net["apply_batch_size"])
            path.with_suffix(".done").write_text(json.dumps(info))
        data["network"] = json.loads(path.with_suffix(".done").read_text())
        rec_path.write_text(json.dumps(data))
    for done in folder.glob("networks/*.done"):
        done.unlink()


def test_verify_reapplies_the_stored_network_and_reruns_the_fit(amortized_folder):
    report = verify(amortized_folder, sample=1, seed=3)
    assert report.ok, report.problems
    assert any(c.startswith("networks: 2 stored network(s)") and "identical" in c for c in report.checks)
    assert any(c.startswith("attack re-run") and "identical perturbation" in c for c in report.checks)


def test_a_swapped_network_is_caught_by_the_reapply(amortized_folder, tmp_path):
    import shutil

    bad = tmp_path / "swapped"
    shutil.copytree(amortized_folder, bad)

    def louder(state):  # still a valid network of the right shape, but not the one that made the perturbation
        return {k: v * 1.5 if v.is_floating_point() else v for k, v in state.items()}

    _edit_network(bad, louder)
    report = verify(bad, sample=1, seed=3)
    assert not report.ok
    assert "the stored network, re-applied, does not give the stored perturbation" in report.problems[0]


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["network"].update(sha256="0" * 64), "does not match its recorded sha256"),
    (lambda d: d.update(network=None), "claims amortized but names no network"),
    (lambda d: d.update(amortized=False), "carries a network but does not claim amortized"),
    (lambda d: d["network"].update(file="perturbations/x.safetensors"), "is not a networks/*.safetensors file"),
    (lambda d: d["network"].update(values=7), "the records claim 7"),
])
def test_network_claims_are_checked_without_running_code(amortized_folder, tmp_path, edit, message):
    import json
    import shutil

    bad = tmp_path / "claims"
    shutil.copytree(amortized_folder, bad)
    for p in _records(bad):
        data = json.loads(p.read_text())
        edit(data)
        p.write_text(json.dumps(data))
    report = verify(bad, rerun=False)
    assert not report.ok and any(message in p for p in report.problems), report.problems


def test_a_network_config_unlike_the_records_is_refused(amortized_folder, tmp_path):
    import json
    import shutil

    bad = tmp_path / "config"
    shutil.copytree(amortized_folder, bad)
    params = json.loads(_records(bad)[0].read_text())["attack_params"]
    _edit_network(bad, lambda state: state, config={**params, "width": 16})
    report = verify(bad, rerun=False)
    assert not report.ok and any("holds config" in p for p in report.problems), report.problems


def test_submit_carries_the_networks_into_the_entry(amortized_folder, tmp_path):
    report, entry = submit(amortized_folder, leaderboard_dir=tmp_path / "lb", name="amortized-test",
                                    sample=1, attack_rerun=False, seed=1)
    assert report.ok and entry is not None, report.problems
    nets = sorted(p.relative_to(entry).as_posix() for p in entry.glob("networks/*.safetensors"))
    assert len(nets) == 2
    import json

    manifest = json.loads((entry / "manifest.json").read_text())
    assert set(nets) <= set(manifest["files"])
    again = verify(entry, rerun=False)
    assert again.ok, again.problems


@pytest.mark.parametrize("patch", [1, 2, 4])
def test_the_network_protects_any_photo_size_pixel_by_pixel(patch):
    """Pixel-unshuffled blocks still give every output pixel its own value, at any size (padding
    is cropped away), and the untrained network returns exactly zero."""
    from spdbench.attacks.amortized import ImmunizerUNet

    torch.manual_seed(0)
    net = ImmunizerUNet(8, patch)
    x = torch.rand(2, 3, 70, 66)
    assert torch.equal(net(x), torch.zeros_like(x))
    torch.nn.init.normal_(net.out.weight, std=0.05)
    out = net(x)
    assert out.shape == x.shape and bool((out.abs() <= 1).all())
    block = out[:, :, :4, :4].flatten(2)
    assert float(block.std(dim=2).min()) > 0, "values inside one block must differ"


def test_show_plots_the_fit_and_reports_both_costs(amortized_folder):
    from spdbench.report.run_page import build_report

    page = build_report(amortized_folder)
    assert "Loss curves" in page and page.count("data:image/png;base64,") >= 2
    assert "amortized attack" in page and ", fit " in page and " s / image" in page
