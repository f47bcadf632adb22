"""LTP's KSM tests (testcases/kernel/mem/ksm/ksm01-ksm07), ported with their helpers
(create_same_memory, ksm_group_check, final_group_check, wait_ksmd_full_scan,
test_ksm_merge_across_nodes). Each runs on both implementations.

- ksm01-ksm04 run create_same_memory() with "-s 4" (4 MiB per child in 1 MiB units,
  three children: LTP's default is -s 128, whose 98,304 pages would make the pure-Python
  reference slow; the counts scale exactly). As LTP does since smart scan exists,
  smart_scan is 0 while they run ("Disable smart scan for correct volatile counts").
- wait_ksmd_full_scan() waits until full_scans grew by 3; LTP polls with sleep(1),
  here ksmd runs round by round until then: more rounds change nothing in these
  converged states, and a simulated second at sleep_millisecs=0 is a great many
  rounds.
- ksm02/ksm04 bind the children to one node (MPOL_BIND) and then run again in a
  cpuset of that node; the model has NUMA policies but no cpusets, so the second run
  puts the processes on that node as their home node (where MPOL_DEFAULT allocates).
- ksm03/ksm04 run inside a memory cgroup (memory.max = 1 GiB, never reached by these
  sizes); the model has no memory cgroups: the KSM counts, all that is checked, do not
  depend on it.
- ksm05 (CVE-2011-2183) is the exit-versus-ksmd race on the mm_slot list: exits at
  every point of the scan, and the machine must stay consistent.
- ksm07 polls every 10 ms of simulated time instead of every second (thousands of
  rounds either way).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ksmcore.constants import MADV_MERGEABLE, MPOL_BIND, PAGE_SIZE

TST_MB = 1 << 20
pages = TST_MB // PAGE_SIZE  # pages per MB


# ---- the helpers of ksm_test.h / ksm_helper.c

def wait_ksmd_full_scan(m: Any) -> None:
    full_scans = m.ksm.full_scans
    at_least = full_scans + 3
    while m.ksm.full_scans < at_least:
        m.ksm.scan(full_scans=1)


def final_group_check(m: Any, run: int, pages_shared: int, pages_sharing: int,
                      pages_volatile: int, pages_unshared: int, sleep_millisecs: int,
                      pages_to_scan: int) -> None:
    assert m.ksm.run == run
    ksm_run_orig = m.ksm.run
    m.ksm.run = 0  # the reads race with ksmd otherwise
    s = m.ksm.stats()
    got = (s["pages_shared"], s["pages_sharing"], s["pages_volatile"], s["pages_unshared"],
           s["sleep_millisecs"], s["pages_to_scan"])
    assert got == (pages_shared, pages_sharing, pages_volatile, pages_unshared,
                   sleep_millisecs, pages_to_scan)
    m.check_invariants()
    m.ksm.run = ksm_run_orig


def ksm_group_check(m: Any, run: int, *expected: int) -> None:
    assert run == 1, "group_check run is not 1"
    wait_ksmd_full_scan(m)  # wait for the ksm daemon to scan all mergeable pages
    final_group_check(m, run, *expected)


# (data, mergeable_size) per phase, as ksm_data0/1/2; children from the fourth on
# follow child 0
KSM_DATA = [
    [("c", False), ("c", False), ("d", False), ("d", False)],
    [("a", False), ("b", False), ("d", False), ("d", True)],  # True: one page has 'e'
    [("a", False), ("a", False), ("d", False), ("d", False)],
]


def create_same_memory(m: Any, size: int, num: int, unit: int, node: int | None = None,
                       bind: bool = False) -> None:
    total_unit = size // unit
    unit_pages = unit * pages
    children, memory = [], []
    for _ in range(num):  # create_ksm_child(): mmap + MADV_MERGEABLE each unit
        p = m.spawn(node=node or 0)
        if bind:
            p.set_mempolicy(MPOL_BIND, [node])
        units = [p.mmap(unit_pages) for _ in range(total_unit)]
        for a in units:
            p.madvise(a, unit_pages * PAGE_SIZE, MADV_MERGEABLE)
        children.append(p)
        memory.append(units)

    total = size * pages * num
    m.ksm.smart_scan = 0
    m.ksm.run = 2
    m.ksm.max_page_sharing = total
    m.ksm.run = 1
    m.ksm.pages_to_scan = total
    m.ksm.sleep_millisecs = 0

    def child_memset(phase: int) -> None:  # ksm_child_memset() in every child
        for i, p in enumerate(children):
            data, with_e = KSM_DATA[min(i, 2) if i < 3 else 0][phase]
            for a in memory[i]:
                p.fill(a, np.full((unit_pages, PAGE_SIZE), ord(data), np.uint8))
            if with_e:
                p.write(memory[i][-1] + unit_pages * PAGE_SIZE - 1, b"e")

    expected = [(2, total - 2, 0, 0), (3, total - 3, 0, 0), (1, total - 1, 0, 0),
                (1, total - 2, 0, 1)]
    for phase, (shared, sharing, volatile, unshared) in enumerate(expected):
        child_memset(phase)
        ksm_group_check(m, 1, shared, sharing, volatile, unshared, 0, total)

    m.ksm.run = 2  # "KSM unmerging..."
    for i, p in enumerate(children):  # the children verify their memory and finish
        data, with_e = KSM_DATA[min(i, 2)][3]
        last = memory[i][-1] + unit_pages * PAGE_SIZE - 1
        assert p.read(last, 1) == (b"e" if with_e else data.encode())
        assert p.read(memory[i][0], 1) == data.encode()
    final_group_check(m, 2, 0, 0, 0, 0, 0, total)
    m.ksm.run = 0  # "stop KSM."
    final_group_check(m, 0, 0, 0, 0, 0, 0, total)
    for p in children:
        p.exit()
    m.ksm.smart_scan = 1  # save_restore


def test_ksm01(Machine: type) -> None:
    m = Machine()
    m.ksm.merge_across_nodes = 1
    create_same_memory(m, size=4, num=3, unit=1)


def test_ksm02(Machine: type) -> None:
    """MPOL_BIND to one node of two, then (cpuset of that node) that node as home."""
    m = Machine(nodes=2)
    m.ksm.merge_across_nodes = 1
    create_same_memory(m, size=4, num=3, unit=1, node=1, bind=True)
    create_same_memory(m, size=4, num=3, unit=1, node=1)


def test_ksm03(Machine: type) -> None:
    """ksm01 inside a memory cgroup of 1 GiB (not modelled; it never binds), with a
    fourth child that follows the first (the -n option)."""
    m = Machine()
    m.ksm.merge_across_nodes = 1
    create_same_memory(m, size=2, num=4, unit=1)


def test_ksm04(Machine: type) -> None:
    """The memcg of ksm03 plus MPOL_BIND, then again in a cpuset of the node."""
    m = Machine(nodes=2)
    m.ksm.merge_across_nodes = 1
    create_same_memory(m, size=2, num=3, unit=2, node=0, bind=True)
    create_same_memory(m, size=2, num=3, unit=2, node=1)


def test_ksm05(Machine: type) -> None:
    """CVE-2011-2183: a child madvises one page (SAFE_MEMALIGN: never written) and dies
    while ksmd runs. Exits at each point of the scan: between rounds with the only mm
    (the race of the CVE: the list empties under ksmd), while ksmd's cursor is on it,
    and while it is queued; ksmd must go on and the machine stay consistent."""
    m = Machine()
    m.ksm.run = 1
    other = m.spawn()
    a = other.mmap(2)
    other.fill(a, np.full((2, PAGE_SIZE), 7, np.uint8))
    for when in ("only mm", "cursor on it", "queued"):
        child = m.spawn()
        ptr = child.mmap(1)
        child.madvise(ptr, PAGE_SIZE, MADV_MERGEABLE)
        if when == "cursor on it":
            other.madvise(a, 2 * PAGE_SIZE, MADV_MERGEABLE)
            m.ksm.scan(full_scans=1)
            m.ksm.do_scan(1)  # the cursor is in the child's slot (listed after other)
        elif when == "queued":
            m.ksm.do_scan(1)  # ksmd is in other's slot, the child's comes next
        child.exit()  # *(volatile char *)NULL = 0: SIGSEGV, the mm goes
        for _ in range(3):
            m.ksm.do_scan(100)
            m.check_invariants()
    assert m.ksm.pages_shared == 1  # ksmd still works: other's pages merged


def test_ksm06(Machine: type) -> None:
    """test_ksm_merge_across_nodes(100) on two nodes: one mbind'ed area per node, all
    the same value; merge_across_nodes=1: 1 / 199; =0: one KSM page per node."""
    nr_pages, num_nodes = 100, 2
    m = Machine(nodes=num_nodes)
    p = m.spawn()
    for node in range(num_nodes):
        a = p.mmap(nr_pages, node=node)  # mmap + mbind(MPOL_BIND, node)
        p.madvise(a, nr_pages * PAGE_SIZE, MADV_MERGEABLE)
        p.fill(a, np.full((nr_pages, PAGE_SIZE), 10, np.uint8))  # memset(memory[i], 10)
    total = nr_pages * num_nodes
    m.ksm.sleep_millisecs = 0
    m.ksm.pages_to_scan = total
    m.ksm.run = 2
    m.ksm.max_page_sharing = total
    m.ksm.merge_across_nodes = 1
    m.ksm.run = 1
    ksm_group_check(m, 1, 1, total - 1, 0, 0, 0, total)
    m.ksm.run = 2
    m.ksm.merge_across_nodes = 0
    m.ksm.run = 1
    ksm_group_check(m, 1, num_nodes, total - num_nodes, 0, 0, 0, total)
    assert sorted(n["nid"] for n in m.ksm.stable_nodes()) == [0, 1]
    m.ksm.run = 2


def test_ksm07(Machine: type) -> None:
    """smart_scan: one page of 'a'; over many full scans, at least half of the scans
    skip it (in fact 8 of every 9 once it is old)."""
    m = Machine()
    p = m.spawn()
    memory = p.mmap(1)
    p.madvise(memory, PAGE_SIZE, MADV_MERGEABLE)
    p.write(memory, b"a" * PAGE_SIZE)
    m.ksm.run = 2
    m.ksm.run = 1
    m.ksm.pages_to_scan = 100
    m.ksm.sleep_millisecs = 0
    m.ksm.smart_scan = 1
    full_scans_begin = m.ksm.full_scans
    pages_skipped_begin = m.ksm.pages_skipped
    while m.ksm.full_scans < full_scans_begin + 3:  # wait_ksmd_full_scan(), 10 ms polls
        m.run_for(0.010)
    m.ksm.run = 0
    diff_pages = m.ksm.pages_skipped - pages_skipped_begin
    diff_scans = m.ksm.full_scans - full_scans_begin
    assert diff_scans > 1000
    assert diff_pages >= diff_scans * 50 // 100, "not enough pages have been skipped"
    # the exact count: processed at visits 1-4, 6, 9, 14 and every ninth after
    processed = 7 + max(0, (diff_scans - 14) // 9)
    assert diff_pages == diff_scans - processed
