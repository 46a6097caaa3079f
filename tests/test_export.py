"""Per-image export (issue 37): the values the board's means come from, one flat table."""
import json
from pathlib import Path

import numpy as np
import pandas as pd

from spdbench.report.board import ranking
from spdbench.report.export import IDENTITY, per_image_frame, write_per_image
from spdbench.store.records import load_records

ENTRIES = Path(__file__).resolve().parents[1] / "leaderboard" / "entries"


def test_export_reproduces_the_board_means_from_its_rows(tmp_path):
    """Averaging the exported SSIMs over prompts and photos gives each board row's SSIM: the file
    holds every value the board used, attributed to the right photo and cell."""
    recs = {name: load_records(ENTRIES / name) for name in ("smoke-pca-minus", "smoke-advdm")}
    csv = write_per_image(recs, tmp_path)[0]
    df = pd.read_csv(csv)
    assert list(df.columns[:len(IDENTITY)]) == list(IDENTITY)
    assert len(df) == sum(len(r.image_names) for rs in recs.values() for r in rs)
    board = ranking([r for rs in recs.values() for r in rs])
    test = df[df["split"] == "test"]
    for _, row in board.iterrows():
        cells = test[(test["attack"] == row["method"]) & (test["eps_label"] == row["eps_label"])]
        per_image = cells.groupby("image_name")["protection.ssim"].mean()
        assert np.isclose(per_image.mean(), row["ssim"], rtol=0, atol=1e-9), (row["method"], row["eps_label"])
    assert all(json.loads(p) is not None for p in df["params"])
    assert df["image_sha256"].str.len().eq(64).all()


def test_export_columns_only_grow(tmp_path):
    """A value an entry does not hold is an empty cell, not a missing column: the schema is the
    union, identity columns first, the rest sorted by name."""
    a = load_records(ENTRIES / "smoke-none")
    b = load_records(ENTRIES / "smoke-inpaint-pca-minus")
    df = per_image_frame({"smoke-none": a, "smoke-inpaint-pca-minus": b})
    values = list(df.columns[len(IDENTITY):])
    assert values == sorted(values) and "protection_region.ssim" in values
    assert df.loc[df["entry"] == "smoke-none", "protection_region.ssim"].isna().all()
    assert df.loc[df["entry"] == "smoke-inpaint-pca-minus", "protection_region.ssim"].notna().all()
