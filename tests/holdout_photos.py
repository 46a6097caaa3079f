"""A hold-out photo set that does not ship with spdbench: scikit-image's grey photos (none of them
is a bundled photo), written as RGB PNGs into a test's folder. Stands in for the maintainer's
private set in CI."""
from pathlib import Path

import numpy as np
from PIL import Image

HOLDOUT_PHOTOS = ("camera", "moon", "coins", "brick", "grass", "gravel", "clock", "cell")


def write_holdout(folder: Path, names=HOLDOUT_PHOTOS) -> Path:
    import skimage.data

    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        grey = getattr(skimage.data, name)()
        Image.fromarray(np.stack([grey] * 3, axis=-1).astype(np.uint8)).save(folder / f"{name}.png")
    return folder
