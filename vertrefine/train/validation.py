"""Validation at 1 mm: reconstruction DSC of decoded patches against the cache's clean 1 mm masks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .patch_cache import DOWNSAMPLE, PatchCache

# --------------------------------------------------------------------------------------------------
# Validation at 1 mm
# --------------------------------------------------------------------------------------------------


def validation_masks(cache: PatchCache, indices: Sequence[int]) -> torch.Tensor:
    """bool [n, 1, 128, 128, 128] 1 mm masks of the patches ``indices`` (2 MB each: ask per batch)."""
    return torch.from_numpy(np.stack([cache.mask(int(i)) for i in indices]))[:, None]


def reconstruction_dice(
    logits_lowres: torch.Tensor, masks: torch.Tensor, threshold: float = 0.5, *, upsample: bool = True
) -> torch.Tensor:
    """Dice [B] at 1 mm of decoder logits [B,1,64,64,64] (upsampled as the exported decoder does) vs masks.

    ``upsample`` False: the logits are on the 1 mm grid already [B,1,128,128,128] (a conditioned decoder's).
    Two empty masks score 1.
    """
    logits = logits_lowres.float()
    if upsample:
        logits = F.interpolate(logits, scale_factor=DOWNSAMPLE, mode="trilinear", align_corners=False)
    predicted = (logits > float(np.log(threshold / (1.0 - threshold)))).flatten(1)
    truth = masks.to(predicted.device).flatten(1).bool()
    overlap = (predicted & truth).sum(1).double()
    sizes = predicted.sum(1).double() + truth.sum(1).double()
    return torch.where(sizes > 0, 2.0 * overlap / sizes.clamp(min=1.0), torch.ones_like(sizes)).float()
