"""The QC image: each vertebra cut through its own centre, flagged vertebrae named."""

import numpy as np

from vertrefine.qc import QcVertebra, _banded, write_qc_png


def test_sagittal_bands_cut_each_vertebra_through_its_own_centre():
    array = np.zeros((60, 20, 30), np.int32)
    array[5:25, 5:15, 3:7] = 1  # an upper vertebra to the right (i 3..6)
    array[35:55, 5:15, 20:24] = 2  # a lower one far to the left (i 20..23): no single sagittal plane holds both
    vertebrae = [QcVertebra(2, "L2", (45.0, 10.0, 21.5)), QcVertebra(1, "L1", (15.0, 10.0, 4.5))]
    plane = _banded(array, vertebrae, axis=2)
    assert plane.shape == (60, 20)
    assert set(np.unique(plane[:30])) == {0, 1} and set(np.unique(plane[30:])) == {0, 2}
    middle = array[:, :, 15]
    assert not middle.any()  # the volume's middle plane shows neither


def test_qc_png_is_written_with_flags(tmp_path):
    before = np.zeros((40, 30, 30), np.int32)
    before[5:15, 8:20, 8:20] = 20
    before[22:34, 8:20, 8:20] = 21
    after = before.copy()
    after[22:34, 8:20, 8:14] = 0
    vertebrae = [QcVertebra(20, "L1", (10.0, 14.0, 14.0)), QcVertebra(21, "L2", (28.0, 14.0, 14.0), "kept input")]
    path = write_qc_png(before, after, tmp_path / "qc.png", title="case", vertebrae=vertebrae)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    empty = write_qc_png(np.zeros((10, 10, 10)), np.zeros((10, 10, 10)), tmp_path / "empty.png")
    assert empty.stat().st_size > 0
