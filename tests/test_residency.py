"""Clean pages of a mapped weight file are given back; modified ones never are."""

import mmap
import sys

import numpy as np
import pytest

from appliance.engines.residency import file_mappings, release_clean_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")


def _mapped(path, access):
    with open(path, "r+b") as f:
        return mmap.mmap(f.fileno(), 0, access=access)


def test_clean_pages_are_released_and_read_back(tmp_path):
    path = tmp_path / "weights.data"
    data = np.arange(4 << 20, dtype=np.uint8)  # 4 MiB
    path.write_bytes(data.tobytes())
    view = _mapped(path, mmap.ACCESS_COPY)
    assert np.frombuffer(view, dtype=np.uint8).sum() == data.sum()  # touch every page
    (start, end, resident, written), = file_mappings(path)
    assert end - start == data.nbytes and resident >= data.nbytes // 2 and written == 0
    assert release_clean_pages(path) == resident
    assert file_mappings(path)[0][2] == 0
    assert np.array_equal(np.frombuffer(view, dtype=np.uint8), data)  # read again from the file
    view.close()


def test_modified_pages_are_kept(tmp_path):
    path = tmp_path / "weights.data"
    path.write_bytes(bytes(1 << 20))
    view = _mapped(path, mmap.ACCESS_COPY)  # private: writes stay in this process
    view[:5] = b"hello"
    assert release_clean_pages(path) == 0
    assert view[:5] == b"hello"
    view.close()
