"""Shared memory: ring sizing within a budget (known answers), sizes on the command line, and the
owner lock that decides what cleanup may remove."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from enserve.server.config import parse_size
from enserve.server.dataplane.shm import OWNER, Arena, clean_leftovers, ours
from enserve.server.dataplane.slots import ring_rows


def test_ring_rows_keep_what_fits_and_share_the_rest_in_proportion():
    assert ring_rows([100, 50], [10, 5], [1000, 2000], 10**9) == [100, 50]  # everything fits
    # need 10*1000 + 5*2000 = 20000; the other 80000 of 180000 wanted beyond it: 4/9 of each extra
    assert ring_rows([100, 50], [10, 5], [1000, 2000], 100_000) == [50, 25]
    assert ring_rows([100, 50], [10, 5], [1000, 2000], 20_000) == [10, 5]  # the minimums exactly
    assert ring_rows([100, 50], [10, 5], [1000, 2000], 19_999) is None
    assert ring_rows([64], [64], [12288], 64 * 12288) == [64]


@pytest.mark.parametrize("text,size", [("67108864", 67108864), ("64M", 64 << 20), ("64MiB", 64 << 20),
                                       ("1.5G", 3 << 29), ("512k", 512 << 10), ("48MB", 48 << 20)])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "lots", "-1M", "nan", "inf"])
def test_bad_sizes_say_what_a_size_is(text):
    with pytest.raises(ValueError, match="is not a size|must be a finite number"):
        parse_size(text)


CRASH = """
import os
from enserve.server.dataplane.shm import OWNER, Arena
Arena.create("crashed.0", 4096)
print(OWNER.run, flush=True)
os._exit(0)  # as a SIGKILL does: nothing is unlinked
"""


def test_cleanup_removes_only_objects_whose_owner_lock_is_free():
    mine = Arena.create(f"test{os.getpid()}.0", 8192)
    try:
        run = OWNER.run
        assert f"enserve.{os.getpid()}.{run}.lock" in ours(os.getpid())
        assert os.stat(f"/dev/shm/{mine.name[1:]}").st_blocks * 512 >= 8192  # reserved (fallocate)
        crashed = subprocess.run([sys.executable, "-c", CRASH], capture_output=True, text=True, check=True)
        dead_run = crashed.stdout.strip()
        left = [n for n in ours() if f".{dead_run}." in n]
        assert len(left) == 2, left  # its object and its lock
        other = subprocess.run([sys.executable, "-c", "from enserve.server.dataplane.shm import clean_leftovers as c; "
                                "print(sorted(c()))"], capture_output=True, text=True, check=True)
        assert other.stdout.strip() == str(sorted(left))  # another process removes the dead run's ...
        assert mine.name[1:] in ours(os.getpid())  # ... and never a live one's
        assert clean_leftovers() == []
    finally:
        mine.close()
    assert ours(os.getpid()) == []  # the last object closed gives the lock back
    assert OWNER.run is None and OWNER.bytes == 0
