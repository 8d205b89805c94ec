"""Surface meshes of vertebrae: marching cubes on a refined vertebra's probability patch, or on the mask of a
vertebra written as the input shows it (passed through), STL in patient LPS mm.

What is written is a closed 2-manifold as an STL reader sees it (vertices merged by position after the
float32 rounding of STL): every edge is shared by exactly two triangles, none has zero area, and the
normals point outwards. Marching cubes (Lewiner, scikit-image) gives that for smooth fields, but not by
itself for the fields refine meshes too: a vertebra kept as input is a binary field, whose face saddles
lie exactly on the 0.5 level (two sheets then pinch into edges shared by four triangles), and a grid value
on or within rounding of the level puts vertices of several cube edges on one point. So the surface is
taken :data:`LEVEL_OFFSET` below the threshold with no grid value within :data:`SEPARATION` of it (every
vertex then lies at least that fraction of a voxel from the grid points, far above float32's rounding),
and checked; an offset that still leaves the surface open (not seen in testing) is replaced by the next.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .spatial import PatchBox
from .volume import Geometry

LEVEL_OFFSET = 1e-3
"""The iso-surface is taken this far below the threshold (probabilities): binary fields move by 0.001 voxel."""
SEPARATION = 1e-3
"""No grid value is closer than this to the iso-level (nudged away from it, on its own side)."""
_OFFSETS = (LEVEL_OFFSET, 2.7 * LEVEL_OFFSET, -LEVEL_OFFSET)


def vertebra_mesh(probability: np.ndarray, owned: np.ndarray, box: PatchBox, geometry: Geometry, level: float = 0.5):
    """A closed ``trimesh.Trimesh`` of the ``level`` iso-surface of one vertebra, vertices in LPS mm.

    ``probability`` is the vertebra's 128^3 patch [z, y, x] on ``geometry`` (the working grid) starting at
    ``box``; ``owned`` (same shape) is False where another vertebra won the voxel, so neighbours do not
    overlap. A vertebra touching the patch border is closed along it; one in several pieces (or with a hole,
    a ring) gives one closed surface per piece. Returns None when the surface is empty. Raises ValueError if
    no iso-level gives a closed surface.
    """
    field = np.where(owned, probability, 0.0).astype(np.float64)
    return _field_mesh(field, box.start, geometry, level)


def instance_mesh(instances: np.ndarray, instance_id: int, geometry: Geometry):
    """A closed ``trimesh.Trimesh`` of the voxels of ``instances == instance_id``, vertices in LPS mm.

    For a vertebra written as the input shows it (passed through, e.g. every vertebra of an input finer
    than 3 mm kept as it is): ``instances`` is the instance array [z, y, x] on ``geometry`` (the working
    grid). The surface is the binary mask's 0.5 level, closed as :func:`vertebra_mesh` closes it. Returns
    None when no voxel holds ``instance_id``; raises ValueError if no iso-level gives a closed surface.
    """
    from scipy import ndimage

    mask = instances == instance_id
    boxes = ndimage.find_objects(mask.astype(np.uint8))
    if not boxes or boxes[0] is None:
        return None
    box = boxes[0]
    return _field_mesh(mask[box].astype(np.float64), tuple(s.start for s in box), geometry, 0.5)


def _field_mesh(field: np.ndarray, start: tuple[int, ...], geometry: Geometry, level: float):
    """The closed ``level`` surface of ``field`` [z, y, x] whose voxel (0, 0, 0) is index ``start`` (k, j, i)
    of ``geometry``; None when empty."""
    if not (field > level).any():
        return None
    padded = np.pad(field, 1)  # a vertebra touching the patch border still gets a closed surface
    for offset in _OFFSETS:
        mesh = _surface(padded, level - offset, np.asarray(start, dtype=np.float64) - 1.0, geometry)
        if mesh is not None:
            return mesh
    raise ValueError(f"no closed surface of the vertebra at level {level} (marching cubes left it open)")


def _surface(padded: np.ndarray, iso: float, start: np.ndarray, geometry: Geometry):
    """The closed, outward iso-surface of ``padded`` at ``iso`` (index ``start`` = patch origin), or None."""
    import trimesh
    from skimage.measure import marching_cubes

    near = np.abs(padded - iso) < SEPARATION
    field = np.where(near, np.where(padded >= iso, iso + SEPARATION, iso - SEPARATION), padded)
    verts_kji, faces, _, _ = marching_cubes(field, level=iso, allow_degenerate=False)
    verts_lps = geometry.index_to_physical((verts_kji + start)[:, ::-1])
    mesh = trimesh.Trimesh(vertices=verts_lps, faces=faces, process=False)
    mesh.update_faces(mesh.nondegenerate_faces())
    as_read = trimesh.Trimesh(vertices=mesh.vertices.astype(np.float32), faces=mesh.faces)  # merged, as STL is read
    if not (as_read.is_watertight and len(as_read.faces) == len(mesh.faces)):
        return None
    trimesh.repair.fix_normals(mesh)  # the (k, j, i) -> LPS map may mirror, which flips the winding
    return mesh


def stl_name(name: str) -> str:
    """A file name for the mesh of vertebra ``name``: 'L3' -> 'L3.stl', 'label 30' -> 'label_30.stl'
    (no spaces or characters that need quoting in a shell)."""
    return (re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip()).strip("._") or "vertebra") + ".stl"


def write_stl(mesh, path: str | Path) -> Path:
    """Write a mesh as binary STL, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        mesh.export(str(tmp), file_type="stl")
    return path
