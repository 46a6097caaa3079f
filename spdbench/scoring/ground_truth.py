"""Edit success against ground truth: how close an instruction edit comes to the instruction's exact result.

Why not a registered metric (metrics.py): a metric compares a distorted edit with a reference edit,
`fn(x, y)`; edit success needs the *photo* and the *instruction* (its exact transform,
spdbench.data.instructions), which only an instruction suite with exact transforms has. So it is
its own scorer, run by the harness on suites that set `Suite.ground_truth` (smoke-instruct: an
offline editor trained on those transforms). Real instruction editors (InstructPix2Pix on the hub)
were not trained to produce these exact results: the measure is offline-only.

Per image, PSNR (metrics.psnr, dB, higher = closer) of
- `protected`: the edit of the protected photo against the exact result on the *clean* photo (what
  the user asked for), and
- `clean`: the clean photo's edit against the same exact result (what the editor manages unprotected).
`clean - protected` is the success a protection takes away.
"""
from __future__ import annotations

import torch

from spdbench.data.instructions import exact_edit, has_exact_edit
from spdbench.errors import InputError
from spdbench.scoring.metrics import psnr

#: the two per-image series a record holds (Record.ground_truth), and their meaning
SERIES = {"protected": "PSNR (dB) of the protected photo's edit vs the instruction's exact result on the clean photo",
          "clean": "PSNR (dB) of the clean photo's edit vs the same exact result"}
CONVENTION = ("ground truth: PSNR (metrics.psnr, dB) against spdbench.data.instructions.exact_edit(instruction, "
              "clean photo); offline suites only")


def edit_success(photos: torch.Tensor, instruction: str, clean_edit: torch.Tensor,
                 protected_edit: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"protected": (N,), "clean": (N,)}: PSNR of each edit against `instruction`'s exact result
    on the clean `photos` (all (N, 3, H, W) in [0, 1])."""
    if not has_exact_edit(instruction):
        raise InputError(f"instruction {instruction!r} has no exact result, so edit success has no ground truth; "
                         "use a suite whose prompts are spdbench.data.instructions.EDITS")
    truth = exact_edit(instruction, photos.float()).to(clean_edit.device)
    return {"protected": psnr(protected_edit.float(), truth), "clean": psnr(clean_edit.float(), truth)}
