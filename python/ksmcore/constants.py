"""Constants shared by the engine and the reference: the kernel's numbers and names."""

from __future__ import annotations

PAGE_SIZE = 4096
PAGE_SHIFT = 12
ZERO_PFN = 0  # the zero page; never allocated, always all zeros
MMAP_BASE = 0x10000000  # first address a process's mmap returns

MADV_MERGEABLE = 12
MADV_UNMERGEABLE = 13
MADV_DONTNEED = 4
MADV_HUGEPAGE = 14
MADV_NOHUGEPAGE = 15

# rmap_item->address flag bits (mm/ksm.c)
SEQNR_MASK = 0x0FF
UNSTABLE_FLAG = 0x100
STABLE_FLAG = 0x200

STABLE_NODE_CHAIN = -1024
SIZEOF_RMAP_ITEM = 64  # sizeof(struct ksm_rmap_item) on 64-bit, used by general_profit

# calc_checksum() of the all-zero 4 KiB page: low 32 bits of XXH64(page, seed 0)
ZERO_CHECKSUM = 0x32D8BBDB

# Smart scan (should_skip_rmap_item)
SKIP_MIN_AGE = 3

# The scan-time advisor
KSM_ADVISOR_MIN_CPU = 10
EWMA_WEIGHT = 30

KSM_RUN_STOP = 0
KSM_RUN_MERGE = 1
KSM_RUN_UNMERGE = 2

# Every writable file of /sys/kernel/mm/ksm/ with its default.
KNOB_DEFAULTS: dict[str, int | str] = {
    "sleep_millisecs": 20,
    "pages_to_scan": 100,
    "run": 0,
    "merge_across_nodes": 1,
    "max_page_sharing": 256,
    "stable_node_chains_prune_millisecs": 2000,
    "use_zero_pages": 0,
    "smart_scan": 1,
    "advisor_mode": "none",
    "advisor_max_cpu": 70,
    "advisor_min_pages_to_scan": 500,
    "advisor_max_pages_to_scan": 30000,
    "advisor_target_scan_time": 200,
}

# The read-only counters of /sys/kernel/mm/ksm/.
COUNTERS = (
    "pages_scanned",
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "pages_skipped",
    "ksm_zero_pages",
    "full_scans",
    "stable_node_chains",
    "stable_node_dups",
    "general_profit",
)

# Every file of /sys/kernel/mm/ksm/, in the kernel's attribute order.
SYSFS_FILES = (
    "sleep_millisecs",
    "pages_to_scan",
    "run",
    "pages_scanned",
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "pages_skipped",
    "ksm_zero_pages",
    "full_scans",
    "merge_across_nodes",
    "max_page_sharing",
    "stable_node_chains",
    "stable_node_dups",
    "stable_node_chains_prune_millisecs",
    "use_zero_pages",
    "general_profit",
    "smart_scan",
    "advisor_mode",
    "advisor_max_cpu",
    "advisor_min_pages_to_scan",
    "advisor_max_pages_to_scan",
    "advisor_target_scan_time",
)

# The lines of /proc/<pid>/ksm_stat, in order.
KSM_STAT_FIELDS = (
    "ksm_rmap_items",
    "ksm_zero_pages",
    "ksm_merging_pages",
    "ksm_process_profit",
    "ksm_merge_any",
    "ksm_mergeable",
)

FIRST_PID = 1000

# set_mempolicy(2) modes and move_pages(2) flags (include/uapi/linux/mempolicy.h)
MPOL_DEFAULT = 0
MPOL_PREFERRED = 1
MPOL_BIND = 2
MPOL_INTERLEAVE = 3
MPOL_LOCAL = 4
MPOL_PREFERRED_MANY = 5
MPOL_WEIGHTED_INTERLEAVE = 6
MPOL_MF_MOVE = 1 << 1
MPOL_MF_MOVE_ALL = 1 << 2
