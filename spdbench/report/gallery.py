"""The leaderboard page's gallery: per method, one test photo across the budgets, in the layout of
the seed study's Figure 3 (eps across; the photo and its edit, then the protected photo and its
edit, down). Built from the example strips each run folder or entry holds (examples.py); nothing
is copied -- the page links the strips where they are and shows one panel of each.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union
from urllib.parse import quote

from spdbench.verify.entry import png_size
from spdbench.store.strips import PANELS, example_rel
from spdbench.report.text import SHOWN_PX as SHOWN
from spdbench.store.records import Record, Status, method_label

_GAP = 4  # examples.py's gap between panels


def _png_size(path: Path) -> Optional[tuple[int, int]]:
    """(width, height) from the PNG header (checked as a PNG by the entry schema before we get here)."""
    try:
        with open(path, "rb") as f:
            return png_size(f.read(24))
    except OSError:
        return None


def _panel(path: Path, out_dir: Path, k: int) -> Optional[dict]:
    """What the page needs to show panel k of a strip: its link and the offsets at SHOWN px."""
    size = _png_size(path)
    if size is None:
        return None
    width, side = size
    if k * (side + _GAP) + side > width:
        return None
    scale = SHOWN / side
    return dict(src=quote(os.path.relpath(path, out_dir).replace(os.sep, "/")), width=round(width * scale),
                left=round(k * (side + _GAP) * scale))


def method_gallery(folder: Path, records: Sequence[Record], out_dir: Path) -> Optional[dict]:
    """One method's row block, or None when its folder holds no strips (older entries)."""
    test = [r for r in records if r.status == Status.ok and r.split.value == "test"]
    if not test:
        return None
    prompt = sorted({r.prompt_key for r in test})[0]
    cells = sorted((r for r in test if r.prompt_key == prompt), key=lambda r: r.eps)
    image = cells[0].image_names[0]
    columns = []
    for r in cells:
        strip = folder / example_rel(r.cell_id, image)
        if strip.is_file():
            columns.append(dict(eps=r.eps_label, protected=_panel(strip, out_dir, 1),
                                edit=_panel(strip, out_dir, PANELS.index("edit of protected"))))
    if not columns:
        return None
    first = folder / example_rel(cells[0].cell_id, image)
    return dict(method=method_label(cells[0]), suite=cells[0].suite, image=image, prompt=cells[0].prompt,
                photo=_panel(first, out_dir, 0), clean_edit=_panel(first, out_dir, PANELS.index("edit of photo")),
                columns=columns)


def galleries(folders: Sequence[Union[str, Path]], records_by_folder: dict, out_dir: Union[str, Path]) -> list[dict]:
    out = []
    for folder in folders:
        g = method_gallery(Path(folder), records_by_folder.get(str(folder), []), Path(out_dir))
        if g is not None:
            out.append(g)
    return sorted(out, key=lambda g: (g["suite"], g["method"]))
