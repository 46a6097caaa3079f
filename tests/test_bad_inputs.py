"""The bad-input matrix: each case raises a specific spdbench error whose message names the problem,
and no record already written is modified."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import spdbench
from spdbench.scoring import metrics
from spdbench.budget import Budget
from spdbench.data.photos import load_folder, load_manifest, write_manifest
from spdbench.errors import (AttackError, BudgetError, InputError, RecordError, TargetLoadError,
                             UnknownNameError)
from spdbench.harness.protect import protect
from spdbench.purifiers import get_purifier
from spdbench.store.records import read_record
from spdbench.targets import load_sd15

from harness_helpers import OverBudget, Raises, ReturnsNaN, WrongDtype, WrongShape, fast_images, fast_suite


@pytest.fixture(scope="module")
def existing(tmp_path_factory):
    """A finished run whose files must survive every bad input untouched."""
    out = tmp_path_factory.mktemp("existing")
    spdbench.run("uniform-noise", suite=fast_suite(), out=out, target="tiny-random", images=fast_images(4))
    return out


def _snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class WrongDevice(spdbench.Attack):
    def perturb(self, images, target, budget, generator=None):
        return torch.zeros(images.shape, device="meta")


def _x(**kw):
    return torch.rand(2, 3, 16, 16, **kw)


def _folder_case(tmp, kind):
    d = tmp / kind
    d.mkdir()
    if kind == "unreadable":
        (d / "photo.png").write_bytes(b"\x89PNG\r\n garbage")
    return load_folder(d)


def _manifest_case(tmp):
    d = tmp / "m"
    d.mkdir()
    Image.fromarray(np.full((16, 16, 3), 7, np.uint8)).save(d / "a.png")
    m = write_manifest(["a.png"], d / "manifest.json", root=d)
    Image.fromarray(np.full((16, 16, 3), 9, np.uint8)).save(d / "a.png")
    return load_manifest(m, d, size=16)


def _record_case(tmp, content):
    p = tmp / "rec.json"
    p.write_text(content)
    return read_record(p)


def _missing_component(tmp):
    t = spdbench.load_target("tiny-random")
    folder = t.save_pretrained(tmp / "model")
    shutil.rmtree(folder / "text_encoder")
    return load_sd15(folder)


def _attack(cls):
    return protect(cls(), None, _x(), Budget("linf", "8/255"), batch_size=2, seed=0)


CASES = [
    ("shape-3d", lambda t: spdbench.get_attack("none")(torch.rand(3, 8, 8), None, Budget()), InputError, "shape"),
    ("grey", lambda t: metrics.ssim(torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16)), InputError, "greyscale"),
    ("rgba", lambda t: metrics.psnr(torch.rand(1, 4, 16, 16), torch.rand(1, 4, 16, 16)), InputError, "RGBA"),
    ("uint8", lambda t: metrics.psnr(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), _x()[:1, :, :8, :8]), InputError,
     "torch.uint8"),
    ("0..255", lambda t: metrics.psnr(_x() * 255, _x()), InputError, "divide by 255"),
    ("[-1,1]", lambda t: metrics.psnr(_x() * 2 - 1, _x()), InputError, "[-1, 1]"),
    ("nan", lambda t: metrics.ssim(_x().index_fill(0, torch.tensor([0]), float("nan")), _x()), InputError, "NaN"),
    ("inf", lambda t: spdbench.get_attack("none")(_x() + float("inf"), None, Budget()), InputError, "Inf"),
    ("empty-folder", lambda t: _folder_case(t, "empty"), InputError, "contains no images"),
    ("unreadable-file", lambda t: _folder_case(t, "unreadable"), InputError, "not a readable image"),
    ("manifest-sha", _manifest_case, InputError, "sha256 of a.png"),
    ("eps-negative", lambda t: Budget("linf", -4 / 255), BudgetError, "eps must be > 0"),
    ("eps-zero", lambda t: Budget("linf", 0), BudgetError, "eps must be > 0"),
    ("eps-above-1", lambda t: Budget("linf", 2.0), BudgetError, "above 1"),
    ("eps-16-not-16/255", lambda t: Budget("linf", "16"), BudgetError, "did you mean '16/255'"),
    ("unknown-norm", lambda t: Budget("l1", "4/255"), BudgetError, "unknown norm"),
    ("unknown-attack", lambda t: spdbench.get_attack("photoguard-encodr"), UnknownNameError, "Did you mean"),
    ("unknown-suite", lambda t: spdbench.run("none", suite="smoek"), UnknownNameError, "unknown suite 'smoek'"),
    ("unknown-prompt", lambda t: spdbench.run("none", suite=fast_suite(), prompts=["P9"], target="tiny-random",
                                              images=fast_images(2), out=t / "r"), UnknownNameError, "unknown prompt"),
    ("unknown-metric", lambda t: metrics.get_metric("ssmi"), UnknownNameError, "Did you mean 'ssim'"),
    ("unknown-purifier", lambda t: get_purifier("jpeg"), UnknownNameError, "unknown purifier"),
    ("attack-raises", lambda t: _attack(Raises), AttackError, "raised ValueError: boom"),
    ("attack-wrong-shape", lambda t: _attack(WrongShape), AttackError, "shape (1, 3, 8, 8)"),
    ("attack-nan", lambda t: _attack(ReturnsNaN), AttackError, "NaN"),
    ("attack-wrong-dtype", lambda t: _attack(WrongDtype), AttackError, "dtype torch.float64"),
    ("attack-wrong-device", lambda t: _attack(WrongDevice), AttackError, "on meta"),
    ("record-truncated", lambda t: _record_case(t, '{"kind": "spdbench-record", "sche'), RecordError, "not valid JSON"),
    ("record-foreign", lambda t: _record_case(t, json.dumps({"name": "x"})), RecordError, "not a spdbench record"),
    ("record-schema", lambda t: _record_case(t, json.dumps({"kind": "spdbench-record", "schema_version": 2})),
     RecordError, "fails the schema"),
    ("record-version", lambda t: _record_case(t, json.dumps({"kind": "spdbench-record", "schema_version": 99})),
     RecordError, "schema_version 99"),
    ("model-missing-part", _missing_component, TargetLoadError, "missing component(s): text_encoder"),
]


@pytest.mark.parametrize("name,fn,error,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_named_and_nothing_is_lost(existing, tmp_path, name, fn, error, needle):
    before = _snapshot(existing)
    with pytest.raises(error) as info:
        fn(tmp_path)
    assert needle in str(info.value), f"message does not name the problem: {info.value}"
    assert "\n" not in str(info.value).strip() or name.startswith("record"), "one-line message"
    assert _snapshot(existing) == before


def test_over_budget_is_projected_not_refused():
    p = _attack(OverBudget)
    assert p.over_budget_images == 2 and p.max_norm_returned == pytest.approx(3 * 8 / 255)
    assert float((p.adv - p.adv.clamp(0, 1)).abs().max()) == 0
