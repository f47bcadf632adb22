"""KSM's global state (the file-scope variables of mm/ksm.c) and its small helpers."""

from __future__ import annotations

import xxhash

from ..advisor import AdvisorCtx
from ..constants import KNOB_DEFAULTS
from ..timing import NSEC_PER_MSEC, CostModel
from ..tracing import Tracer
from .ksm_structs import KsmScan, MmSlot, RmapItem, StableNode
from .mm import PAGE_MASK, Frame, Mm, PhysMem, Vma
from .rbtree import RbRoot


def calc_checksum(page: Frame) -> int:
    """``calc_checksum``: (u32) xxhash(page, PAGE_SIZE, 0), XXH64 on 64-bit kernels."""
    return xxhash.xxh64_intdigest(page.data, seed=0) & 0xFFFFFFFF


def memcmp_pages(a: Frame, b: Frame) -> int:
    """``memcmp_pages``: -1, 0 or 1 in unsigned-byte lexicographic order."""
    if a.data == b.data:
        return 0
    return -1 if a.data < b.data else 1


class KsmState:
    """Knobs, counters, trees, lists and the scan cursor of mm/ksm.c."""

    def __init__(self, mem: PhysMem) -> None:
        self.mem = mem
        self.nr_node_ids = mem.nodes
        # The writable sysfs files, by file name (ksm_run is knobs["run"], ...).
        self.knobs: dict[str, int | str] = dict(KNOB_DEFAULTS)
        if not mem.profile.has("smart_scan"):
            self.knobs["smart_scan"] = 0  # a ksmd without smart scan never skips
        self.ksm_nr_node_ids = 1
        # The kernel allocates nr_node_ids roots on the first switch to
        # merge_across_nodes=0; having them from the start changes nothing.
        self.root_stable_tree = [RbRoot() for _ in range(self.nr_node_ids)]
        self.root_unstable_tree = [RbRoot() for _ in range(self.nr_node_ids)]
        self.migrate_nodes: list[StableNode] = []  # index 0 = list head's next
        self.ksm_mm_head = MmSlot(None)
        self.ksm_scan = KsmScan(self.ksm_mm_head)
        # Simulated time (timing.py): ktime in ns since boot; ksmd's CPU time
        # (task_sched_runtime); the pages processed so far in the running batch,
        # whose cost the clock takes at the batch's end.
        self.clock_ns = 0
        self.ksmd_cpu_ns = 0
        self.batch_pages = 0
        self.cost = CostModel()
        # ksmd's thread: when it next wakes from its sleep, None while it waits
        # for work (ksm_thread_wait)
        self.ksmd_wake: int | None = None
        self.advisor_ctx = AdvisorCtx()
        self.tracer = Tracer()
        # Counters
        self.ksm_pages_scanned = 0
        self.ksm_pages_shared = 0
        self.ksm_pages_sharing = 0
        self.ksm_pages_unshared = 0
        self.ksm_rmap_items = 0
        self.ksm_stable_node_chains = 0
        self.ksm_stable_node_dups = 0
        self.ksm_pages_skipped = 0

    # ---- knobs as the kernel's variables ------------------------------------------

    @property
    def ksm_run(self) -> int:
        return int(self.knobs["run"])

    @property
    def ksm_merge_across_nodes(self) -> int:
        return int(self.knobs["merge_across_nodes"])

    @property
    def ksm_max_page_sharing(self) -> int:
        return int(self.knobs["max_page_sharing"])

    @property
    def ksm_zero_pages(self) -> int:
        return self.mem.ksm_zero_pages

    @property
    def jiffies(self) -> int:
        """jiffies with HZ=1000: whole milliseconds of the clock."""
        return self.clock_ns // NSEC_PER_MSEC

    def ktime_get(self) -> int:
        """The clock within a batch: its start plus the pages processed so far."""
        return self.clock_ns + self.batch_pages * self.cost.page_ns

    def task_sched_runtime(self) -> int:
        """ksmd's CPU time, with the running batch's pages so far."""
        return self.ksmd_cpu_ns + self.batch_pages * self.cost.page_ns

    def rmap_item_id(self, rmap_item: RmapItem) -> tuple[int, int]:
        """An rmap_item as a tracepoint names it: (pid, page address)."""
        assert rmap_item.mm is not None
        return rmap_item.mm.pid, rmap_item.address & PAGE_MASK

    # ---- small helpers ------------------------------------------------------------

    def get_kpfn_nid(self, kpfn: int) -> int:
        """Tree index for a pfn: 0 when merging across nodes, else pfn_to_nid."""
        return 0 if self.ksm_merge_across_nodes else self.mem.frames[kpfn].nid

    def mm_list_empty(self) -> bool:
        return self.ksm_mm_head.next is self.ksm_mm_head

    def ksmd_should_run(self) -> bool:
        return bool(self.ksm_run & 1) and not self.mm_list_empty()

    def alloc_rmap_item(self) -> RmapItem:
        self.ksm_rmap_items += 1
        return RmapItem()

    def free_rmap_item(self, rmap_item: RmapItem) -> None:
        self.ksm_rmap_items -= 1
        assert rmap_item.mm is not None
        rmap_item.mm.ksm_rmap_items -= 1
        rmap_item.mm = None  # debug safety, as the kernel does

    def find_mergeable_vma(self, mm: Mm, addr: int) -> Vma | None:
        """``find_mergeable_vma``. Every VMA of the model that holds an rmap_item's
        page has an anon_vma (it was faulted in), so that test is implied."""
        if mm.exiting:
            return None
        vma = mm.vma_lookup(addr)
        if vma is None or not vma.mergeable:
            return None
        return vma

    def get_mergeable_page(self, rmap_item: RmapItem) -> Frame | None:
        """``get_mergeable_page``: the anonymous page now mapped at the item's address
        in a still-mergeable VMA (folio_walk without FW_ZEROPAGE: no zero page)."""
        mm = rmap_item.mm
        if mm is None:
            # A freed item left in a stale unstable root (see the report's notes);
            # the kernel would read freed memory here.
            return None
        addr = rmap_item.address & PAGE_MASK
        if self.find_mergeable_vma(mm, addr) is None:
            return None
        return mm.frame_at(addr)

    def break_cow(self, rmap_item: RmapItem) -> None:
        """``break_cow``: undo a merge by unsharing the item's page if still mergeable."""
        mm = rmap_item.mm
        assert mm is not None
        addr = rmap_item.address & PAGE_MASK
        vma = self.find_mergeable_vma(mm, addr)
        if vma is not None:
            mm.break_ksm(vma, addr)

    def unmerge_ksm_pages(self, mm: Mm, vma: Vma, start: int, end: int) -> None:
        """``unmerge_ksm_pages``: break_ksm on every page of [start, end) (only
        addresses with a PTE can hold a KSM page, so only those are visited)."""
        if mm.exiting:
            return
        for addr in mm.present_in(start, end):
            mm.break_ksm(vma, addr)



