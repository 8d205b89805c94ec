"""Surface meshes of refined vertebrae: marching cubes on the probability patch, STL in patient LPS mm."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .spatial import PatchBox
from .volume import Geometry


def vertebra_mesh(probability: np.ndarray, owned: np.ndarray, box: PatchBox, geometry: Geometry, level: float = 0.5):
    """A closed ``trimesh.Trimesh`` of the ``level`` iso-surface of one vertebra, vertices in LPS mm.

    ``probability`` is the vertebra's 128^3 patch on ``geometry`` (the working grid) starting at ``box``;
    ``owned`` (same shape) is False where another vertebra won the voxel, so neighbours do not overlap.
    Returns None when the surface is empty.
    """
    import trimesh
    from skimage.measure import marching_cubes

    field = np.where(owned, probability, 0.0).astype(np.float32)
    if not (field > level).any():
        return None
    padded = np.pad(field, 1)  # a vertebra touching the patch border still gets a closed surface
    verts_kji, faces, _, _ = marching_cubes(padded, level=level, allow_degenerate=False)
    verts_kji += np.asarray(box.start, dtype=np.float64) - 1.0
    verts_lps = geometry.index_to_physical(verts_kji[:, ::-1])
    # no degenerate (zero-area) triangles, which a saddle produces and which break watertightness once a
    # reader merges the STL's vertices; process=False keeps marching cubes' vertices as they are
    mesh = trimesh.Trimesh(vertices=verts_lps, faces=faces, process=False)
    trimesh.repair.fix_normals(mesh)  # the (k, j, i) -> LPS map may mirror, which flips the winding
    return mesh


def write_stl(mesh, path: str | Path) -> Path:
    """Write a mesh as binary STL, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        mesh.export(str(tmp), file_type="stl")
    return path
