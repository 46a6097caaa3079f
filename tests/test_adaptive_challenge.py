"""The model-side adaptive attacker as a challenge (verify/challenge.py, harness/adaptive.py): the
editor LoRA-fine-tuned on a committed entry's protected train photos is filed, verified (weights by
hash, values re-edited with the stored weights, the patch trained again from scratch) and shown in
its own column "after editor fine-tuning", which lowers neither the worst case nor the rank; a
forged one is refused; a purifier challenge.json from before `challenge_kind` still parses."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from spdbench.cli import main
from spdbench.errors import RecordError
from spdbench.harness.adaptive import COLUMN, LoraPatch
from spdbench.report.board import build, ranking
from spdbench.report.site.build import write_site
from spdbench.report.site.pages import budget_href, entry_href
from spdbench.targets import load_target
from spdbench.verify.challenge import (CHALLENGE_FILE, VERIFIED_FILE, read_challenge, read_verified,
                                       run_adaptive_challenge, verify_challenge, weights_rel)
from spdbench.verify.claims import load_checked_by_folder
from challenge_helpers import assert_refused_and_not_applied, forge_values

ENTRY = Path(__file__).resolve().parents[1] / "leaderboard" / "entries" / "smoke-pca-minus"
EPS = "16/255"
STEPS = 2  # a short patch: the test is of the machinery, not of the attacker's strength


@pytest.fixture(scope="module")
def filed(tmp_path_factory):
    """The entry copied into a fresh leaderboard folder, an adaptive challenge filed and verified."""
    torch.set_num_threads(1)
    board = tmp_path_factory.mktemp("lb")
    entry = board / "entries" / ENTRY.name
    shutil.copytree(ENTRY, entry)
    model = load_target("tiny")
    folder = board / "challenges" / "lora"
    ch = run_adaptive_challenge(entry, folder, LoraPatch(steps=STEPS), eps=[EPS], model=model)
    report = verify_challenge(folder, sample=1, seed=3, model=model)
    return board, entry, folder, ch, report, model


def _records(entry: Path):
    return [r for recs in load_checked_by_folder([entry])[0].values() for r in recs]


def test_adaptive_challenge_is_verified_and_shows_its_column(filed):
    board, entry, folder, ch, report, _ = filed
    assert report.ok, report.problems
    assert any(c.startswith("retrained: 1 LoRA patch(es) trained again from scratch") for c in report.checks)
    assert (folder / VERIFIED_FILE).is_file()
    # what was written: kind, every setting, the weights as safetensors with their hash
    data = json.loads((folder / CHALLENGE_FILE).read_text())
    assert data["challenge_kind"] == "adaptive" and data["purifier"] is None
    assert data["adaptive"]["settings"] == LoraPatch(steps=STEPS).to_dict()
    assert {"lora_targets", "lora_alpha", "optimizer", "timesteps"} <= set(data["adaptive"])
    (patch,) = ch.patches
    blob = (folder / weights_rel(EPS)).read_bytes()
    assert patch.sha256 == hashlib.sha256(blob).hexdigest() and len(patch.losses) == STEPS
    assert load_safetensors(blob) and not list(folder.rglob("*.pt")) and not list(folder.rglob("*.pkl"))
    assert {c.prompt_key for c in ch.cells} == {"P3", "P4"} and all(c.split == "test" for c in ch.cells)
    # against the original editor's clean edit (the column) and against the patched editor's own
    assert all(c.values["ssim"] != c.values_same_editor["ssim"] for c in ch.cells)

    found, left = read_verified(board / "challenges")
    assert [c.name for c in found] == ["lora"] and not [n for n, _ in left if n == "lora"]
    records = _records(entry)
    before = ranking(records).set_index("eps_label")
    after = ranking(records, challenges=found).set_index("eps_label")
    per_image = np.mean([c.values["ssim"] for c in ch.cells], axis=0)  # prompts averaged per photo
    assert after.loc[EPS, "adapted_ssim"] == pytest.approx(float(per_image.mean()))
    assert after.loc[EPS, "adapted_by"] == "lora" and np.isnan(after.loc["8/255", "adapted_ssim"])
    # a separate threat: the worst case, the rank and the flags are those without it
    assert list(after["worst_ssim"]) == list(before["worst_ssim"])
    assert list(after["rank"]) == list(before["rank"]) and list(after["flags"]) == list(before["flags"])
    assert "challenged_by" not in after.columns

    # the board with a second entry the challenge does not cover: its row shows "–"
    shutil.copytree(ENTRY.parent / "smoke-none", board / "entries" / "smoke-none")
    by_folder = load_checked_by_folder([entry, board / "entries" / "smoke-none"])[0]
    both = [r for recs in by_folder.values() for r in recs]
    readme = build(both, board, formats=["md", "csv"])["md"].read_text()
    head = f"{COLUMN}: SSIM ↓"
    sections = {s.splitlines()[0]: s for s in readme.split("\n## ")}
    sixteen, eight = sections[f"img2img · smoke · linf eps {EPS}"], sections["img2img · smoke · linf eps 8/255"]
    assert "lowers neither the worst case nor the rank" in sixteen and "(lora;" in sixteen
    table = sixteen.split("### Protection")[1].split("###")[0]
    lines = [line.split(" | ") for line in table.strip().splitlines() if line.startswith("|")]
    col = lines[0].index(head)
    cells = {row[1]: row[col] for row in lines[2:]}
    assert cells["pca-minus"].strip("*").startswith(f"{per_image.mean():.4f}") and cells["none"] == "–"
    assert head not in eight  # no row of that budget was challenged: no column
    assert "adapted_ssim" in (board / "leaderboard.csv").read_text()

    site = write_site(by_folder, board / "site", board_dir=board)
    text = {p.name: p.read_text() for p in site}
    assert head in text[budget_href("smoke", "linf", EPS)] and head not in text[budget_href("smoke", "linf", "8/255")]
    assert "lowers neither the worst case nor the rank" in text[budget_href("smoke", "linf", EPS)]
    assert COLUMN in text[entry_href(ENTRY.name)] and COLUMN not in text[entry_href("smoke-none")]
    assert COLUMN in text["index.html"] and f"{per_image.mean():.4f}" in text["index.html"]  # the overview too
    entry_page = text[entry_href(ENTRY.name)]  # the entry's own page lists the challenge, what it ran
    assert "Challenges (verified outside evaluations)" in entry_page and "editor LoRA-fine-tuned" in entry_page
    assert "Challenges (verified" not in text[entry_href("smoke-none")]


def test_forged_adaptive_challenge_is_refused(filed):
    board, _, folder, _, _, model = filed
    report = verify_challenge(forge_values(folder, board, -0.05), sample=1, seed=3, model=model)
    assert_refused_and_not_applied(report, board)


def test_swapped_weights_are_refused(filed):
    """Weights that are not the file challenge.json hashes: refused before any model runs."""
    board, _, folder, _, _, _ = filed
    forged = board / "challenges" / "weights"
    shutil.copytree(folder, forged)
    path = forged / weights_rel(EPS)
    weights = load_safetensors(path.read_bytes())
    path.write_bytes(save_safetensors({k: v * 1.5 for k, v in weights.items()}))
    report = verify_challenge(forged, sample=1, seed=3)
    assert report.problems == [f"{weights_rel(EPS)} is not the LoRA patch challenge.json names (sha256 differs)"]


def _old_purifier_challenge() -> dict:
    """A challenge.json as purifier challenges were written before `challenge_kind` existed."""
    return {"kind": "spdbench-challenge", "schema_version": 1, "name": "nu", "entry": "smoke-pca-minus",
            "entry_manifest_sha256": "0" * 64, "suite": "smoke", "purifier": {"name": "jpeg75", "quality": 75},
            "editor_fingerprint": "abc", "device": "cpu", "provenance": {},
            "cells": [{"cell_id": "c", "eps_label": "16/255", "prompt_key": "P3", "split": "test",
                       "image_names": ["a.png", "b.png"], "values": {"ssim": [0.5, 0.6]},
                       "purified_sha256": ["1" * 64, "2" * 64]}]}


def test_old_purifier_challenge_json_parses(tmp_path):
    (tmp_path / CHALLENGE_FILE).write_text(json.dumps(_old_purifier_challenge()))
    ch, _ = read_challenge(tmp_path)
    assert ch.challenge_kind == "purifier" and ch.purifier["name"] == "jpeg75" and ch.patches == []
    assert ch.cells[0].purified_sha256 == ["1" * 64, "2" * 64]


@pytest.mark.parametrize("change, words", [
    ({"challenge_kind": "adaptive"}, "an adaptive challenge holds its settings and patches"),
    ({"adaptive": {"settings": {}}}, "a purifier challenge names its purifier"),
])
def test_a_challenge_of_mixed_kinds_is_refused(tmp_path, change, words):
    (tmp_path / CHALLENGE_FILE).write_text(json.dumps({**_old_purifier_challenge(), **change}))
    with pytest.raises(RecordError, match=words):
        read_challenge(tmp_path)


@pytest.mark.parametrize("argv, words", [
    ([], "expected exactly one"),
    (["--purifier", "jpeg75", "--adaptive", "lora"], "expected exactly one"),
    (["--purifier", "jpeg75", "--steps", "3"], "--steps: a LoRA setting"),
    (["--adaptive", "lora", "--prompts", "P3"], "--prompts: an adaptive challenge covers every prompt"),
])
def test_challenge_command_refuses_unclear_kinds(tmp_path, capsys, argv, words):
    assert main(["challenge", str(ENTRY), "--out", str(tmp_path / "c"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_an_untrained_patch_gives_the_entrys_own_numbers(tmp_path):
    """With a vanishing learning rate the patched editor is the editor: both value blocks equal the
    committed records' per-image protection (the challenge scores on the harness's rule)."""
    torch.set_num_threads(1)
    entry = tmp_path / "entries" / ENTRY.name
    shutil.copytree(ENTRY, entry)
    ch = run_adaptive_challenge(entry, tmp_path / "challenges" / "flat", LoraPatch(steps=1, lr=1e-12), eps=[EPS])
    records = {r.cell_id: r for r in _records(entry)}
    for cell in ch.cells:
        own = records[cell.cell_id].protection["ssim"]
        assert cell.values["ssim"] == pytest.approx(own, abs=2e-4)
        assert cell.values_same_editor["ssim"] == pytest.approx(own, abs=2e-4)


@pytest.mark.slow
def test_an_adaptive_challenge_on_an_inpainting_entry_is_verified(tmp_path):
    """The LoRA attacker on an inpainting editor (its UNet sees the photo through the masked photo's
    latent): filed with the objective it trained, each edit with its photo's mask, and verified."""
    torch.set_num_threads(1)
    source = ENTRY.parent / "smoke-inpaint-pca-minus"
    entry = tmp_path / "entries" / source.name
    shutil.copytree(source, entry)
    model = load_target("tiny-inpaint")
    folder = tmp_path / "challenges" / "lora"
    ch = run_adaptive_challenge(entry, folder, LoraPatch(steps=STEPS), eps=[EPS], model=model)
    data = json.loads((folder / CHALLENGE_FILE).read_text())
    assert data["adaptive"]["editor"] == "inpainting" and "clean photo" in data["adaptive"]["objective"]
    assert {c.prompt_key for c in ch.cells} == {"P3", "P4"}
    report = verify_challenge(folder, sample=1, seed=3, model=model)
    assert report.ok, report.problems
