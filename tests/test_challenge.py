"""Outside evaluations (verify/challenge.py): a stronger purifier filed against a committed entry's
stored protections is verified like an entry and lowers the entry on the board, naming itself; a
forged challenge (values or photos that are not what its purifier and the editor give) is refused."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from spdbench.report.board import build, ranking
from spdbench.report.flags import current_challenges, with_challenges
from spdbench.targets import load_target
from spdbench.verify.challenge import (VERIFIED_FILE, png_rel, read_challenge, read_verified,
                                       run_challenge, verify_challenge)
from spdbench.verify.claims import load_checked_by_folder
from challenge_helpers import assert_refused_and_not_applied, forge_values

ENTRY = Path(__file__).resolve().parents[1] / "leaderboard" / "entries" / "smoke-pca-minus"
#: measured: noisy-upscale gives 2 of smoke-pca-minus's 4 test photos at 16/255 (prompt P3) a higher
#: SSIM to the clean edit than any purifier of the suite (0.9056 vs 0.9052, 0.8905 vs 0.8889)
PURIFIER, EPS, PROMPT = "noisy-upscale", "16/255", "P3"


@pytest.fixture(scope="module")
def filed(tmp_path_factory):
    """The entry copied into a fresh leaderboard folder, a challenge filed and verified against it."""
    torch.set_num_threads(1)
    board = tmp_path_factory.mktemp("lb")
    entry = board / "entries" / ENTRY.name
    shutil.copytree(ENTRY, entry)
    model = load_target("tiny")
    folder = board / "challenges" / "nu"
    ch = run_challenge(entry, PURIFIER, folder, eps=[EPS], prompts=[PROMPT], model=model)
    report = verify_challenge(folder, sample=1, seed=3, model=model)
    return board, entry, folder, ch, report, model


def test_challenge_is_verified_and_lowers_the_entry(filed):
    board, entry, folder, ch, report, _ = filed
    assert report.ok, report.problems
    assert (folder / VERIFIED_FILE).is_file() and len(ch.cells) == 1
    found, left = read_verified(board / "challenges")  # (other tests add forged folders beside it)
    found = [c for c in found if c.name == "nu"]
    assert len(found) == 1 and not [name for name, _ in left if name == "nu"]

    records = [r for recs in load_checked_by_folder([entry])[0].values() for r in recs]
    before = ranking(records).set_index("eps_label")
    after = ranking(records, challenges=found).set_index("eps_label")
    assert after.loc[EPS, "worst_ssim"] > before.loc[EPS, "worst_ssim"]  # lowered: less protection promised
    assert after.loc[EPS, "challenged_by"] == "nu"
    assert "worst case lowered by challenge nu" in after.loc[EPS, "flags"]
    assert "challenge:noisy-upscale" in after.loc[EPS, "worst_by"]  # the column is the purifier's
    assert after.loc["8/255", "worst_ssim"] == before.loc["8/255", "worst_ssim"]  # a budget it did not cover

    written = build(records, board, formats=["csv"])  # the board reads LEADERBOARD/challenges/
    csv = written["csv"].read_text()
    assert "challenged_by" in csv and "ssim_after_challenge:noisy-upscale" in csv


def test_a_challenge_can_only_lower(filed):
    """Values below every existing block change no worst case (the worst case is a maximum)."""
    _, entry, folder, ch, _, _ = filed
    weak = ch.model_copy(update={"cells": [c.model_copy(update={"values": {m: [0.0] * len(v) for m, v in
                                                                          c.values.items()}}) for c in ch.cells]})
    records = [r for recs in load_checked_by_folder([entry])[0].values() for r in recs]
    assert with_challenges(records, [weak]) != records
    before, after = ranking(records), ranking(records, challenges=[weak])
    assert list(after["worst_ssim"]) == list(before["worst_ssim"])
    assert after["challenged_by"].isna().all()


def test_forged_values_are_refused(filed, tmp_path):
    board, entry, folder, ch, _, model = filed
    report = verify_challenge(forge_values(folder, board, 0.05), sample=1, seed=3, model=model)
    # its copied verification.json names the old challenge.json: the board does not apply it
    assert_refused_and_not_applied(report, board)


def test_forged_photo_is_refused(filed):
    board, _, folder, ch, _, _ = filed
    forged = board / "challenges" / "swapped"
    shutil.copytree(folder, forged)
    names = ch.cells[0].image_names
    shutil.copy(forged / png_rel(EPS, names[1]), forged / png_rel(EPS, names[0]))
    report = verify_challenge(forged, sample=1, seed=3)
    assert report.problems == [f"{png_rel(EPS, names[0])} is not the purified photo challenge.json names "
                               "(sha256 differs)"]
    assert read_challenge(forged)[0].name == "nu"
    found, left = read_verified(board / "challenges")  # never applied, though its JSON was verified
    assert [c.name for c in found] == ["nu"]
    assert [why for name, why in left if name == "swapped"][0].startswith("challenge.json names challenge 'nu'")


def test_a_challenge_of_other_files_is_not_applied(filed, tmp_path):
    """An entry replaced since (other manifest, other cells): the challenge is listed, never applied."""
    board, entry, folder, ch, _, _ = filed
    records = [r for recs in load_checked_by_folder([entry])[0].values() for r in recs]
    assert current_challenges([ch], records, [str(entry)]) == ([ch], [])
    other = tmp_path / ENTRY.name
    other.mkdir()
    (other / "manifest.json").write_text("{}")
    assert current_challenges([ch], records, [str(other)])[1] == [
        ("challenge nu", f"not applied: it was run against other files of entry {ENTRY.name!r} "
                         "(its manifest changed since)")]
    kept = [r for r in records if r.eps_label != EPS]
    assert current_challenges([ch], kept)[1][0][1].startswith("not applied: it covers cells")


def test_a_mismatched_editor_challenge_names_its_model_and_counts_as_measured(filed, tmp_path):
    """A purifier with a model of its own (swap-vae-tiny-b: tiny-b's VAE round trip) runs with that
    model, which the challenge names with its fingerprint; verify loads it again and refuses another
    fingerprint; on the board the row's worst case is then measured with it."""
    _, entry, _, _, _, model = filed
    folder = tmp_path / "swap"  # not in the shared board's challenges folder: other tests list that one
    ch = run_challenge(entry, "swap-vae-tiny-b", folder, eps=[EPS], prompts=[PROMPT], model=model)
    tiny_b = load_target("tiny-b")
    assert ch.purifier["model"] == "tiny-b" and ch.purifier_model["fingerprint"] == tiny_b.fingerprint
    assert ch.purifier_model["fingerprint"] != model.fingerprint
    report = verify_challenge(folder, entry=entry, sample=1, seed=3, model=model)
    assert report.ok, report.problems

    records = [r for recs in load_checked_by_folder([entry])[0].values() for r in recs]
    test_cells = [r for r in records if r.split.value == "test" and r.eps_label == EPS and r.prompt_key == PROMPT]
    before = ranking(test_cells).set_index("eps_label")
    after = ranking(test_cells, challenges=[ch]).set_index("eps_label")
    assert "swap-vae-tiny-b" in before.loc[EPS, "worst_not_measured"]
    assert "swap-vae-tiny-b" not in after.loc[EPS, "worst_not_measured"]  # the cells the challenge covers

    forged = tmp_path / "swap-forged"
    shutil.copytree(folder, forged)
    text = (forged / "challenge.json").read_text().replace(ch.purifier_model["fingerprint"], "0" * 16)
    (forged / "challenge.json").write_text(text.replace('"name": "swap"', '"name": "swap-forged"'))
    report = verify_challenge(forged, entry=entry, sample=1, seed=3, model=model)
    assert not report.ok and any("fingerprint" in p for p in report.problems), report.problems


@pytest.mark.slow
def test_an_inpainting_entry_is_challenged_with_its_masks(tmp_path):
    """On an inpainting suite the challenge edits each purified photo with the suite's mask of it
    (the entry's own rule for its purifier blocks), verify re-edits them the same way, and the board
    joins it to the whole-image worst case of the cells it covers."""
    inpaint = ENTRY.parent / "smoke-inpaint-pca-minus"
    entry = tmp_path / "entries" / inpaint.name
    shutil.copytree(inpaint, entry)
    model = load_target("tiny-inpaint")
    folder = tmp_path / "challenges" / "nu-inpaint"
    ch = run_challenge(entry, PURIFIER, folder, eps=[EPS], prompts=["P4"], model=model)
    assert len(ch.cells) == 1 and ch.purifier_model is None
    report = verify_challenge(folder, sample=1, seed=3, model=model)
    assert report.ok, report.problems
    records = [r for recs in load_checked_by_folder([entry])[0].values() for r in recs]
    cell = next(r for r in records if r.cell_id == ch.cells[0].cell_id)
    joined = with_challenges([cell], [ch])[0]
    assert joined.purified[ch.block]["ssim"] == ch.cells[0].values["ssim"]
    report = verify_challenge(forge_values(folder, tmp_path, 0.05), sample=1, seed=3, model=model)
    assert not report.ok and "does not reproduce" in report.problems[0], report.problems
