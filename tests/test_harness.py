import json

import pytest
import torch

import spdbench
from spdbench.data.photos import split_indices
from spdbench.errors import UnknownNameError
from spdbench.store.records import Status, load_records, read_record

from harness_helpers import fast_images, fast_suite, recorded_fits


@pytest.fixture(scope="module")
def target():
    return spdbench.load_target("tiny-random")


def test_run_writes_complete_records_and_resumes(tmp_path, target):
    images = fast_images()
    res = spdbench.run("uniform-noise", suite=fast_suite(), out=tmp_path, target=target, images=images,
                       eps=["8/255", "16/255"])
    assert res.ok and len(res.records) == 4 and len(res.computed) == 4  # 2 eps x 1 prompt x 2 splits
    rec = res.records[0]
    assert set(rec.protection) == {"ssim", "psnr", "vifp", "fsim"}
    assert len(rec.protection["ssim"]) == len(rec.image_names) == len(rec.edit_seeds)
    assert rec.target.fingerprint == target.fingerprint and rec.provenance["libraries"]["torch"]
    assert rec.imperceptibility_mean["psnr"] > 25
    n_train = len(split_indices(6)[0])
    assert {len(r.image_names) for r in res.records} == {n_train, 6 - n_train}
    files = sorted((tmp_path / "records").glob("*.json"))
    assert len(files) == 4 and (tmp_path / "records.jsonl").is_file()
    before = {f: f.read_bytes() for f in files}
    again = spdbench.run("uniform-noise", suite=fast_suite(), out=tmp_path, target=target, images=images,
                         eps=["8/255", "16/255"])
    assert again.computed == [] and len(again.reused) == 4
    assert {f: f.read_bytes() for f in files} == before, "resume must not rewrite finished records"


def test_a_run_folder_of_other_weights_is_refused_untouched(tmp_path, target):
    """A retrained model gets new cell ids, so resuming into the old folder would pool two models'
    cells (found re-measuring smoke-inpaint on a retrained tiny-inpaint: `submit` caught it)."""
    from spdbench.errors import InputError

    images = fast_images(4)
    first = spdbench.run("uniform-noise", suite=fast_suite(), out=tmp_path, target=target, images=images)
    assert first.ok
    before = {f: f.read_bytes() for f in tmp_path.rglob("*") if f.is_file()}
    other = spdbench.load_target("tiny-random-1")
    assert other.fingerprint != target.fingerprint
    with pytest.raises(InputError, match=f"holds records measured on target {target.name} {target.fingerprint}.*"
                                         f"this run's target is tiny-random-1 {other.fingerprint}.*another --out"):
        spdbench.run("uniform-noise", suite=fast_suite(), out=tmp_path, target=other, images=images)
    assert {f: f.read_bytes() for f in tmp_path.rglob("*") if f.is_file()} == before


def test_clean_and_protected_edits_share_seeds_and_none_is_identity(tmp_path, target):
    res = spdbench.run("none", suite=fast_suite(), out=tmp_path, target=target, images=fast_images(4))
    for rec in res.records:
        assert rec.protection_mean["ssim"] == pytest.approx(1.0, abs=1e-5), "same seed + same image = same edit"


def test_universal_attack_never_sees_test_images(tmp_path, target, test_attacks, monkeypatch):
    from spdbench.harness import sandbox

    (tmp_path / "seen").mkdir()  # the one folder the sandboxed worker may write besides its own
    monkeypatch.setattr(sandbox, "EXTRA_WRITE", [str(tmp_path / "seen")])
    images = fast_images(6)
    spdbench.run("test-recording-uap", suite=fast_suite(), out=tmp_path / "run", target=target, images=images,
                 attack_params={"record_dir": str(tmp_path / "seen")})
    train, test = split_indices(6)
    fits = recorded_fits(tmp_path / "seen")
    assert len(fits) == 1
    seen = fits[0]
    assert torch.equal(seen, images[train])
    for i in test:
        assert not any(torch.equal(images[i], s) for s in seen)


def test_over_budget_delta_is_projected_and_flagged(tmp_path, target, test_attacks):
    res = spdbench.run("test-over-budget", suite=fast_suite(), out=tmp_path, target=target, images=fast_images(4))
    assert res.ok
    for rec in res.records:
        assert rec.validation.projected and rec.validation.over_budget_images == len(rec.image_names)
        assert rec.validation.max_norm_returned == pytest.approx(3 * 16 / 255, rel=1e-4)
        assert rec.imperceptibility_mean["psnr"] > 20  # the stored image respects the budget


@pytest.mark.parametrize("name,needle", [("test-nan", "NaN"), ("test-wrong-shape", "shape"),
                                         ("test-wrong-dtype", "dtype"), ("test-raises", "boom inside")])
def test_bad_attack_output_is_an_error_record_and_run_continues(tmp_path, target, name, needle, test_attacks):
    res = spdbench.run(name, suite=fast_suite(), out=tmp_path, target=target, images=fast_images(4),
                       eps=["8/255", "16/255"])
    assert not res.ok and len(res.failed) == 4
    assert all(needle in r.error for r in res.failed)
    stored = load_records(tmp_path)
    assert len(stored) == 4 and all(r.status == Status.error for r in stored)


def test_unknown_prompt_and_suite(tmp_path, target):
    with pytest.raises(UnknownNameError, match="Did you mean 'P3'"):
        spdbench.run("none", suite=fast_suite(), prompts=["p3"], out=tmp_path, target=target, images=fast_images(2))
    with pytest.raises(UnknownNameError, match="unknown suite"):
        spdbench.run("none", suite="smok", out=tmp_path)


def test_corrupt_record_is_recomputed_not_trusted(tmp_path, target):
    images = fast_images(4)
    res = spdbench.run("uniform-noise", suite=fast_suite(), out=tmp_path, target=target, images=images)
    path = tmp_path / "records" / f"{res.records[0].cell_id}.json"
    path.write_text(path.read_text()[:50])  # truncated
    again = spdbench.run("uniform-noise", suite=fast_suite(), out=tmp_path, target=target, images=images)
    assert again.records and res.records[0].cell_id in again.computed
    assert read_record(path).protection_mean == res.records[0].protection_mean


def test_leaderboard_outputs(tmp_path, target):
    from spdbench.report.board import build

    images = fast_images(4)
    recs = []
    for attack in ("uniform-noise", "none"):
        recs += spdbench.run(attack, suite=fast_suite(), out=tmp_path / attack, target=target, images=images).records
    written = build(recs, tmp_path / "lb")
    md = written["md"].read_text()
    assert "uniform-noise" in md and "none" in md and "SSIM" in md
    csv = written["csv"].read_text()
    assert csv.splitlines()[0].startswith("method,") and len(csv.splitlines()) == 3
    assert "<table" in written["html"].read_text() and (tmp_path / "lb" / "metrics_vs_eps.png").is_file()


class _OOMAboveTwo(spdbench.Attack):
    """Simulates a GPU that fits at most two images per attack batch."""

    def perturb(self, images, target, budget, generator=None):
        if len(images) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return torch.zeros_like(images)


def test_attack_oom_halves_the_batch_and_is_recorded():
    from spdbench.harness.protect import protect

    x = torch.rand(5, 3, 16, 16)
    p = protect(_OOMAboveTwo(), None, x, spdbench.Budget("linf", "4/255"), batch_size=8, seed=0)
    assert p.adv.shape == x.shape
    assert p.oom_events == [{"batch_size": 8, "retry_with": 4}, {"batch_size": 4, "retry_with": 2}]


def test_edit_oom_halves_the_batch(monkeypatch, target):
    from spdbench.harness.editing import EditSettings, Editor

    editor = Editor(target, EditSettings(steps=2), batch_size=4)
    real = editor._edit_batch

    def fake(images, prompt, seeds):
        if len(images) > 1:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1 GiB")
        return real(images, prompt, seeds)

    monkeypatch.setattr(editor, "_edit_batch", fake)
    x = fast_images(3)
    out = editor.edit(x, "P3", [1, 2, 3])
    assert out.shape == x.shape and [e["retry_with"] for e in editor.oom_events] == [2, 1]


@pytest.mark.slow
def test_compile_flag_records_compile_time_apart(tmp_path):
    t = spdbench.load_target("tiny-random")  # a fresh target: compiling wraps its modules
    res = spdbench.run("uniform-noise", suite=fast_suite(), out=tmp_path, target=t, images=fast_images(2),
                       compile_backend="eager")
    assert res.ok and all(r.timing.compile_s is not None and r.timing.compile_s > 0 for r in res.records)


def test_a_resumed_run_says_how_much_is_done(tmp_path, capsys):
    from harness_helpers import fast_suite

    suite = fast_suite(eps=("8/255", "16/255"), prompts=("P3",), n_images=3)
    spdbench.run("uniform-noise", suite=suite, out=tmp_path / "r", progress=False)
    assert "resuming" not in capsys.readouterr().err
    res = spdbench.run("uniform-noise", suite=suite, out=tmp_path / "r", progress=True)
    err = capsys.readouterr().err
    assert f"resuming: {len(res.records)} of {len(res.records)} cells already done" in err
    assert len(res.reused) == len(res.records) == 4


def test_result_table_is_concise_unless_asked(tmp_path):
    from harness_helpers import fast_suite

    res = spdbench.run("uniform-noise", suite=fast_suite(prompts=("P3",), n_images=3), out=tmp_path / "t")
    short, full = res.table(), res.table(full=True)
    assert list(short.columns) == ["method", "eps", "prompt", "split", "ssim", "psnr", "vifp", "fsim"]
    assert len(short) == len(full) == len(res.records) and {"imp_psnr", "cell_id"} <= set(full.columns)


def test_progress_bar_counts_what_the_summary_counts(tmp_path, monkeypatch, capsys):
    """The bar's total is the number of cells (one per budget, prompt and split), and a resumed run
    counts the cells it reuses so it ends at total, not halfway."""
    import tqdm.auto

    from harness_helpers import fast_suite

    bars = []

    class Recorder:
        def __init__(self, *a, total=None, disable=False, **k):
            self.total, self.n, self.disable = total, 0, disable
            bars.append(self)

        def update(self, n=1):
            self.n += n

        def close(self):
            pass

        def set_postfix_str(self, *a, **k):
            pass

        def write(self, *a, **k):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorder)
    suite = fast_suite(eps=("8/255", "16/255"), prompts=("P3",), n_images=3)
    first = spdbench.run("uniform-noise", suite=suite, out=tmp_path / "r", progress=True)
    assert bars[-1].total == len(first.records) == 4 and bars[-1].n == 4
    victim = sorted((tmp_path / "r" / "records").glob("*16o255*test*.json"))[0]
    victim.unlink()
    capsys.readouterr()
    again = spdbench.run("uniform-noise", suite=suite, out=tmp_path / "r", progress=True)
    assert "resuming: 3 of 4 cells already done" in capsys.readouterr().err
    assert bars[-1].total == 4 and bars[-1].n == 4 and len(again.reused) == 3 and len(again.computed) == 1
