"""The conventions every module shares, defined once: the model's patch and grid, model kinds, devices, counts.

See ``shared/DESIGN.md`` (conventions): a vertebra is cropped as a 128^3 patch of the 1 mm working grid
(LPS, identity direction, arrays ``[z, y, x]``); a bundle records both and refine checks them.
"""

from __future__ import annotations

import numpy as np

PATCH_SIZE = 128
"""Edge of a vertebra's patch, in working-grid voxels."""
SPACING_TOLERANCE_MM = 1e-3
"""Spacings closer than this (mm) are equal: headers carry float noise (3.0000002 mm for 3 mm slices), so a
limit such as "no coarser than 3 mm" compares ``spacing <= limit + SPACING_TOLERANCE_MM``."""
WORKING_SPACING_MM = 1.0
"""Spacing (mm) of the isotropic working grid the model sees."""
MODEL_KINDS = ("vae", "lebm", "lsd-ebm")
"""The models training makes and bundles hold: the autoencoder alone, the paper's latent EBM baseline, and
the latent diffusion EBM (LSD-EBM)."""
DEVICES = ("auto", "cpu", "cuda")
"""Devices to run on: 'auto' takes CUDA where it really works, else the CPU."""


def is_whole_number(value: object, minimum: int = 0) -> bool:
    """True for an int (numpy's too, not a bool) of at least ``minimum``: how settings that count things
    (samples, threads, steps, a seed) are checked."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= minimum
