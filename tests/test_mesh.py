"""STL meshes of vertebrae are closed 2-manifolds as a reader sees them, for every kind of field refine meshes."""

import numpy as np
import pytest
import trimesh
from scipy import ndimage

from vertrefine.mesh import stl_name, vertebra_mesh, write_stl
from vertrefine.spatial import PatchBox
from vertrefine.volume import Geometry

P = 32
_T = np.deg2rad(20)
# oblique and mirrored (det -1), anisotropic, far from the origin: the STL's float32 rounding is coarsest there
GEOMETRY = Geometry(
    (80, 80, 80),
    (0.7, 1.0, 1.3),
    (-512.3, 301.7, 1204.1),
    (np.cos(_T), -np.sin(_T), 0.0, np.sin(_T), np.cos(_T), 0.0, 0.0, 0.0, -1.0),
)
BOX = PatchBox((3, 4, 5), P)
VOXEL_MM3 = 0.7 * 1.0 * 1.3


def _grid():
    return np.mgrid[:P, :P, :P].astype(float)


def _ring() -> np.ndarray:
    z, y, x = _grid()
    radius = np.hypot(y - 16, x - 16)
    return (np.hypot(radius - 9, z - 16) < 4).astype(np.float32)  # a torus: a vertebra's ring around the canal


def _at_border() -> np.ndarray:
    z, y, x = _grid()
    return (((z - 2) ** 2 + (y - 16) ** 2 + (x - 16) ** 2) < 64).astype(np.float32)  # cut by the patch's edge


def _two_blobs() -> np.ndarray:
    z, y, x = _grid()
    one = ((z - 9) ** 2 + (y - 9) ** 2 + (x - 9) ** 2) < 30
    two = ((z - 22) ** 2 + (y - 22) ** 2 + (x - 22) ** 2) < 30
    return (one | two).astype(np.float32)


def _smooth_ball() -> np.ndarray:
    z, y, x = _grid()
    ball = ((z - 16) ** 2 + (y - 15) ** 2 + (x - 17) ** 2) < 81
    return ndimage.gaussian_filter(ball.astype(float), 1.5).astype(np.float32)  # as the decoder's probabilities


def _read_back(mesh, tmp_path) -> trimesh.Trimesh:
    path = write_stl(mesh, tmp_path / "m.stl")
    return trimesh.load(path)  # merges vertices by position, as 3D Slicer and other readers do


def _assert_closed(mesh) -> None:
    assert mesh.is_watertight  # every edge shared by exactly two triangles
    assert mesh.is_winding_consistent and mesh.volume > 0  # outward normals
    assert (mesh.area_faces > 0).all()  # no degenerate triangles


@pytest.mark.parametrize(
    ("name", "field", "pieces", "euler"),
    [
        ("ring with a hole", _ring(), 1, 0),
        ("touching the patch border", _at_border(), 1, 2),
        ("two blobs", _two_blobs(), 2, 4),
        ("smooth probability", _smooth_ball(), 1, 2),
    ],
)
def test_meshes_of_shapes_are_closed_once_written_and_read(name, field, pieces, euler, tmp_path):
    mesh = vertebra_mesh(field, np.ones(field.shape, bool), BOX, GEOMETRY)
    back = _read_back(mesh, tmp_path)
    _assert_closed(back)
    assert len(back.split(only_watertight=False)) == pieces and back.euler_number == euler, name
    if field.max() == 1.0 and set(np.unique(field)) <= {0.0, 1.0}:  # binary: the volume is the voxel count's
        assert back.volume == pytest.approx(field.sum() * VOXEL_MM3, rel=0.05)


def test_binary_and_quantised_fields_do_not_pinch(tmp_path):
    """A vertebra kept as input is meshed from its binary mask: marching cubes at exactly 0.5 pinches two
    sheets into edges of four triangles there; grid values on the level put several vertices on one point."""
    rng = np.random.default_rng(5)
    for _ in range(6):
        binary = (rng.random((P, P, P)) > rng.uniform(0.4, 0.8)).astype(np.float32)
        smooth = ndimage.gaussian_filter(rng.random((P, P, P)), 1.0)
        quantised = (np.round((smooth - smooth.min()) / np.ptp(smooth) * 4) / 4).astype(np.float32)  # 0, .25, .5..
        assert (quantised == 0.5).any()
        for field in (binary, quantised):
            _assert_closed(_read_back(vertebra_mesh(field, np.ones(field.shape, bool), BOX, GEOMETRY), tmp_path))


def test_owned_mask_cuts_a_closed_surface_and_an_empty_field_gives_none(tmp_path):
    field = _at_border()
    owned = np.ones(field.shape, bool)
    owned[:, :, 16:] = False  # a neighbour won half of the voxels
    back = _read_back(vertebra_mesh(field, owned, BOX, GEOMETRY), tmp_path)
    _assert_closed(back)
    assert back.volume == pytest.approx((field * owned).sum() * VOXEL_MM3, rel=0.05)
    assert vertebra_mesh(np.zeros((P, P, P), np.float32), owned, BOX, GEOMETRY) is None


def test_mesh_file_names_have_no_spaces():
    assert stl_name("L3") == "L3.stl" and stl_name("vertebra_2") == "vertebra_2.stl"
    assert stl_name("label 30") == "label_30.stl"
    assert " " not in stl_name("T12 / L1 (fused)") and stl_name("  ") == "vertebra.stl"
