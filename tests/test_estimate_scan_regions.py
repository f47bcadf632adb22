"""PAGEMAP_SCAN on a large, fragmented area: a walk that stops early hands back
regions past its walk_end; each page must be taken once (as the pagemap read does)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from test_estimate_procmem import live, make_area

from ksmcore.estimate import procmem


def test_scan_takes_each_page_once() -> None:
    area = make_area(40, npages=20000, nwritten=16000, mergeable=False)
    with live([area]) as child:
        vmas = procmem.parse_smaps(open(f"/proc/{child.pid}/smaps").read())
        (vma,) = [v for v in vmas if v.start == child.addresses[0]]
        fd = os.open(f"/proc/{child.pid}/pagemap", os.O_RDONLY)
        try:
            try:
                scanned, _ = procmem._choose_pages(fd, [vma], "scan")
            except OSError as e:
                pytest.skip(f"no PAGEMAP_SCAN here: {e}")
            read, _ = procmem._choose_pages(fd, [vma], "pagemap")
        finally:
            os.close(fd)
    expect = (vma.start >> 12) + area.written
    assert len(scanned) == len(np.unique(scanned)) == len(area.written)
    assert np.array_equal(scanned, expect) and np.array_equal(read, expect)
