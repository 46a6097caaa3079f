"""Records stay readable and honest: NaN/Inf read back and are flagged; writes leave no temporary files.

A NaN in a loss curve used to be written as JSON null, after which the record failed its own
schema: resume recomputed it forever and leaderboard/verify refused the whole folder.
"""
from __future__ import annotations

import json
import math
import os
import time

import pytest

from spdbench.store import records as results
from spdbench.errors import RecordError
from spdbench.store.records import (NON_FINITE_FLAG, Record, Status, TargetInfo, Timing, Validation, atomic_write_bytes,
                              finished_cells, load_records, read_record, remove_stale_temp, write_jsonl,
                              write_record)

NAN, INF = float("nan"), float("inf")


def _record(cell: str = "cell-a", **fields) -> Record:
    base = dict(cell_id=cell, attack="pca-minus", suite="smoke", norm="linf", eps=16 / 255, eps_label="16/255",
                prompt_key="P3", prompt="add some snow", split="test",
                target=TargetInfo(name="tiny", source="embedded", fingerprint="f" * 16, dtype="float16", device="cpu"),
                protection={"ssim": [0.5, 0.25]}, protection_mean={"ssim": 0.375}, loss_curve=[3.0, 2.0, 1.0])
    base.update(fields)
    return Record(**base)


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def _strict_json(text: str):
    """Standard JSON only: the bare NaN/Infinity tokens some writers emit are refused."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_read_back_and_are_flagged(tmp_path):
    rec = _record(loss_curve=[4.5e11, NAN, INF, -INF], protection={"ssim": [NAN, 0.5]},
                  protection_mean={"ssim": NAN}, imperceptibility_mean={"psnr": INF},
                  purified_mean={"jpeg": {"ssim": -INF}}, timing=Timing(attack_wall_s=NAN),
                  validation=Validation(max_norm_returned=NAN))
    assert rec.flags == [NON_FINITE_FLAG], "flagged when built, before anything is written"
    path = write_record(rec, tmp_path)
    _strict_json(path.read_text())  # readable by any JSON reader, not only Python's
    back = read_record(path)
    assert back.flags == [NON_FINITE_FLAG]
    for a, b in zip(back.loss_curve, rec.loss_curve):
        assert _same(a, b)
    assert math.isnan(back.protection["ssim"][0]) and back.protection["ssim"][1] == 0.5
    assert math.isnan(back.protection_mean["ssim"]) and back.imperceptibility_mean["psnr"] == INF
    assert back.purified_mean["jpeg"]["ssim"] == -INF
    assert math.isnan(back.timing.attack_wall_s) and math.isnan(back.validation.max_norm_returned)
    assert set(results.non_finite_fields(back)) >= {"loss_curve.1", "loss_curve.2", "protection_mean.ssim",
                                                    "timing.attack_wall_s", "purified_mean.jpeg.ssim"}


def test_a_number_set_after_building_is_flagged_on_write(tmp_path, caplog):
    rec = _record()
    assert rec.flags == []
    rec.loss_curve.append(NAN)
    with caplog.at_level("WARNING", logger="spdbench.store.records"):
        path = write_record(rec, tmp_path)
    assert read_record(path).flags == [NON_FINITE_FLAG]
    assert "loss_curve.3" in caplog.text and rec.cell_id in caplog.text


def test_finite_records_are_not_flagged_and_do_not_share_flags():
    bad, good = _record("bad", loss_curve=[NAN]), _record("good")
    assert bad.flags == [NON_FINITE_FLAG] and good.flags == [] and not results.flag_non_finite(good)
    assert results.flag_non_finite(bad) and bad.flags == [NON_FINITE_FLAG], "flagged once, not twice"


def test_load_records_and_resume_accept_a_non_finite_record(tmp_path):
    write_record(_record("nan-cell", loss_curve=[1.0, NAN]), tmp_path)
    write_record(_record("fine-cell"), tmp_path)
    recs = load_records(tmp_path)  # strict: one NaN record used to make this raise
    assert sorted(r.cell_id for r in recs) == ["fine-cell", "nan-cell"]
    done = finished_cells(tmp_path)
    assert set(done) == {"fine-cell", "nan-cell"}, "resume must not recompute it forever"
    assert done["nan-cell"].flags == [NON_FINITE_FLAG] and done["nan-cell"].status == Status.ok
    jsonl = write_jsonl(recs, tmp_path / "records.jsonl")
    lines = [_strict_json(line) for line in jsonl.read_text().splitlines()]
    assert [Record.model_validate(d).cell_id for d in lines] == [r.cell_id for r in recs]


def test_a_null_where_a_number_belongs_is_still_a_named_error(tmp_path):
    path = write_record(_record(), tmp_path)
    data = json.loads(path.read_text())
    data["loss_curve"][1] = None  # what the old writer produced for NaN
    path.write_text(json.dumps(data))
    with pytest.raises(RecordError, match="loss_curve"):
        read_record(path)


def test_failed_atomic_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "records" / "x.json"
    atomic_write_bytes(target, b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(results.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in target.parent.iterdir()] == ["x.json"]


def test_remove_stale_temp_removes_only_temporary_files(tmp_path):
    run = tmp_path / "run"
    stale = [run / "records" / ".cell.json.abc123.tmp", run / "perturbations" / ".p.safetensors.x.tmp",
             run / "cache" / ".k.safetensors.4242.tmp", run / ".records.jsonl.q.tmp"]
    keep = [run / "records" / "cell.json", run / "cache" / "k.safetensors", run / "records" / "notes.tmp",
            run / ".hidden"]
    for p in stale + keep:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / ".theirs.tmp").write_bytes(b"x")
    os.symlink(outside, run / "linked")  # a link out of the run folder is not followed
    assert remove_stale_temp(run) == sorted(stale)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in keep)
    assert (outside / ".theirs.tmp").exists()
    assert remove_stale_temp(run) == [] and remove_stale_temp(tmp_path / "missing") == []


def test_remove_stale_temp_spares_fresh_files_when_asked(tmp_path):
    old, fresh = tmp_path / ".old.bin.a.tmp", tmp_path / ".fresh.bin.b.tmp"
    old.write_bytes(b"x")
    fresh.write_bytes(b"x")
    past = time.time() - 3600
    os.utime(old, (past, past))
    assert remove_stale_temp(tmp_path, min_age_s=60) == [old]
    assert fresh.exists()
