/*
 * ksmcore.h - the C core of ksmcore: the scanning half of Linux mm/ksm.c.
 *
 * This header is the API and, between CFFI-BEGIN and CFFI-END, the cffi cdef.
 * Python owns the large arrays (page-frame contents in chunks, frame metadata,
 * page-table slots and the rmap_items that live beside them) and hands them to C
 * through struct ksm_ctx; C owns the stable nodes and the red-black tree nodes.
 *
 * Page-table slots: every page of every VMA a process ever mapped has a slot
 * (an index into the per-slot arrays).  Within one mm, slot order is address
 * order, so the kernel's per-mm rmap_list sorted by address is the set of slots
 * of that mm whose ri_flags has KSM_ITEM_EXISTS, walked in slot order.
 */
#ifndef KSMCORE_H
#define KSMCORE_H

#include <stddef.h>
#include <stdint.h>

/* CFFI-BEGIN */
/* The version of this API: raise it with every change between CFFI-BEGIN and
 * CFFI-END that Python must follow; python/ksmcore/_native.py refuses a library
 * built for another. */
#define KSMCORE_ABI_VERSION 8
#define KSM_PAGE_SIZE 4096
#define KSM_MAX_NUMNODES 64
#define KSM_NIL -1

/* pte[] values besides a pfn (pfn 0 is the zero page and never a pte value) */
#define KSM_PTE_NONE -1
#define KSM_PTE_ZERO -2 /* the KSM-placed zero page: a dirty special zero PTE */
#define KSM_PTE_SPLIT_ZERO -3 /* the shared zero page, mapped by a huge page split to a
                               * zero-filled subpage (RMP_USE_SHARED_ZEROPAGE) */

/* transparent huge pages: a PMD-sized anonymous folio of HPAGE_PMD_NR frames */
#define KSM_HPAGE_PMD_NR 512

/* a row of batch_log: pages processed, then pages_sharing, ksm_zero_pages and
 * rmap_items at the batch's end */
#define KSM_BATCH_LOG_COLS 4

/* frame_stable[] values besides a stable node index */
#define KSM_FRAME_NOT_KSM -1
#define KSM_FRAME_KSM_NULL -2 /* KSM folio whose stable node is NULL (merge under way) */

/* chunk_flags[] */
#define KSM_CHUNK_IMAGE 1 /* frames of a read-only memory image: copied on write, never freed */

/* ri_flags[]: the rmap_item's flags, which the kernel keeps in the low bits of
 * rmap_item->address, and two bits about the slot */
#define KSM_SEQNR_MASK 255
#define KSM_UNSTABLE_FLAG 256
#define KSM_STABLE_FLAG 512
#define KSM_ITEM_EXISTS 1024
#define KSM_SLOT_VM_MERGEABLE 2048 /* the page's VMA is VM_MERGEABLE */
#define KSM_SLOT_CSUM_FRESH 4096   /* ri_oldchecksum is the checksum of the page mapped now */

#define KSM_SLOT_BLOCK_SHIFT 6     /* slot_mm[] has one entry per 64 slots */

/* where a stable node is (the kernel's stable_node->head) */
#define KSM_HEAD_TREE 0
#define KSM_HEAD_MIGRATE 1
#define KSM_HEAD_DUP 2
#define KSM_HEAD_FREE 3

#define KSM_STABLE_NODE_CHAIN -1024

struct ksm_rbnode {
    int32_t left, right;
    int32_t parent_color; /* (parent + 1) << 1 | colour (0 red, 1 black), as the
                           * kernel packs them: KSM_NIL's parent is 0 */
};

struct ksm_stable_node {
    int64_t kpfn;              /* the KSM page (not for chains) */
    uint64_t prefix;           /* first 8 bytes of the content, big-endian: KSM pages are
                                * write-protected, so this orders like memcmp, never stale */
    uint64_t chain_prune_time; /* chains only, in jiffies (ms) */
    int32_t hlist;             /* first rmap_item slot, or for a chain its first dup */
    int32_t rmap_hlist_len;    /* KSM_STABLE_NODE_CHAIN for a chain */
    int32_t head;              /* KSM_HEAD_* */
    int32_t chain;             /* for a dup: its chain */
    int32_t next, prev;        /* dup: chain hlist; migrate: migrate_nodes; free: free list */
    int32_t nid;
    int32_t migrated;          /* for the invariant checker only: the page moved since
                                * ksmd last placed the node (nid may be stale) */
    int32_t stale;             /* its page was freed, so the frame no longer names it:
                                * get_ksm_page()'s test, kept here so that a tree walk
                                * need not read the frame table (a miss a level) */
    int32_t pad;               /* 64 bytes: one cache line a node for the tree walks */
};

/* tracepoints raised inside the C core (include/trace/events/ksm.h) */
#define KSM_TRACE_MERGE_ONE_PAGE 1       /* pfn (zero page), slot, err */
#define KSM_TRACE_MERGE_WITH_KSM_PAGE 2  /* kpfn (or -1), pfn, slot, err */
#define KSM_TRACE_REMOVE_KSM_PAGE 3      /* pfn */
#define KSM_TRACE_REMOVE_RMAP_ITEM 4     /* pfn, slot */

struct ksm_trace_event {
    int32_t event;
    int32_t err;
    int64_t kpfn;
    int64_t pfn;
    int64_t slot;
};

/* a PMD-sized anonymous folio (THP): frames head .. head + 511, subpage k at head + k */
struct ksm_folio {
    int64_t head;
    int64_t *maps;   /* per mm that maps it: the slot of subpage 0 (stale entries are
                      * harmless: a subpage counts as mapped there only while the
                      * slot's pte still names it) */
    int32_t nr_maps, maps_cap;
    int32_t mapped;  /* subpages with mapcount > 0: at 0 the folio is freed */
    int32_t shared;  /* subpages with mapcount > 1: mapped by another mm too (fork) */
    int32_t next_free;
    int32_t pad;
};

struct ksm_ctx {
    /* page frames: contents in chunks of (1 << chunk_shift) pages; a chunk's frames
     * all lie on one node, and a chunk is either ordinary memory or an image */
    uint8_t **chunks;
    int32_t chunk_shift;
    int64_t nr_frames;        /* frames covered by the metadata arrays */
    int16_t *chunk_nid;       /* per chunk */
    uint8_t *chunk_flags;     /* per chunk: KSM_CHUNK_IMAGE */
    int32_t *frame_mapcount;
    int32_t *frame_stable;    /* stable node index, or KSM_FRAME_*; on a free frame
                               * it links the free list: KSM_FREE_LINK(next) */
    int32_t *frame_folio;     /* the large folio (THP) the frame belongs to, + 1 (0: none,
                               * so that the array is untouched zero pages where there
                               * are no huge pages); read with frame_folio() in ksm.c */
    int32_t free_head[64];
    int64_t nr_free[64];

    /* page-table slots and the rmap_items beside them: 20 bytes a page */
    int64_t nr_slots;
    int32_t *pte;
    int32_t *slot_mm;         /* per block of KSM_SLOT_BLOCK slots: VMAs start on one */
    uint16_t *ri_flags;       /* rmap_item flags, and KSM_SLOT_* bits of the page's VMA */
    uint32_t *ri_oldchecksum;
    uint8_t *ri_age;
    uint8_t *ri_remaining_skips;
    int32_t *ri_head;  /* STABLE: the stable node; UNSTABLE: its unstable tree node */
    int32_t *ri_hnext; /* the stable node's hlist */

    /* per mm counters (index = mm id) */
    int64_t *mm_rmap_items;
    int64_t *mm_merging_pages;
    int64_t *mm_zero_pages;
    int64_t *mm_thp_split_zero_pages; /* KSM_PTE_SPLIT_ZERO entries of the mm */

    /* stable nodes and the unstable tree's nodes (owned by C) */
    struct ksm_stable_node *stable;
    struct ksm_rbnode *stable_rb; /* stable_rb[i] links stable node i into its tree */
    int32_t stable_cap, stable_used, stable_free;
    struct ksm_rbnode *unode;
    int32_t *uslot;
    int16_t *unid;  /* the unstable tree (node) each tree node is in */
    uint64_t *uprefix; /* the tree page's prefix when inserted: good while the item's
                        * KSM_SLOT_CSUM_FRESH says its page was not written since */
    int32_t ucap, ucount;
    int32_t uquiet_from; /* unstable tree nodes from this index on were inserted since the
                          * last change made outside the scan (every API call that
                          * maps, unmaps, writes, migrates or (un)marks pages sets it
                          * to ucount): their pages are still mapped, mergeable and
                          * unwritten, so their recorded prefix can order a walk */
    /* The unstable tree, kept lazily while nothing outside the scan disturbs it (the
     * whole round, on memory that does not move): inserts and erases go to ulog in
     * order and a search is answered from uhash, the round's nodes by checksum. That
     * decides exactly as the walk would: the nodes' pages are all quiet (see
     * uquiet_from), so the tree is a search tree of distinct contents, and a walk
     * finds a node of equal content or inserts. unstable_tree_disturbed() and
     * ksm_unstable_tree_sync() replay ulog into the rbtree, in the kernel's order, so
     * that the tree has the shape the kernel's would; the rest of the round is then
     * walked as always. unstable_lazy 0 (set by Python) never defers. */
    int32_t unstable_lazy; /* 1 (the default): defer while quiet */
    int32_t ulazy;         /* this round's tree is deferred now */
    int32_t *ulog;         /* the erases, as pairs (tn, ucount then): the inserts are
                            * in tn order, so an erase is placed by the nodes before it */
    int64_t nr_ulog, ulog_cap;
    uint32_t *uhash;       /* open addressing by (checksum, nid): tn + 1, or 0 when
                            * empty (a fresh table is calloc's, untouched memory) */
    uint8_t *utag;         /* beside each bucket, its node's checksum's top byte: a
                            * probe past another checksum ends here, without reading
                            * the node (three cache misses in a large round) */
    int64_t uhash_mask;
    int32_t uhash_filled;  /* nodes below it may be in uhash (all were inserted in tn
                            * order): what a new round clears */
    int32_t uhash_entries; /* buckets in use */
    uint64_t stable_gen; /* moves with every rbtree operation on a stable tree */
    /* 1 (the default): the scan takes its shortcuts (a recorded prefix for a page's
     * first bytes, below a walk decided before it starts); 0: it reads every prefix
     * and walks every search (tests/test_scan_shortcuts.py runs both side by side) */
    int32_t scan_shortcuts;
    int64_t nr_prefix_recorded; /* how often a recorded prefix answered */
    /* The prefixes of the nodes linked in the stable trees, counted (open addressing,
     * spfx_count 0 for an empty bucket), the chains among those nodes and the range of
     * prefixes whose walk passes each: a page whose prefix no tree node has, outside
     * every chain's range, while no node is stale, is ordered against each node on
     * its path by the prefix alone, passes no chain and finds nothing; its walk is
     * skipped (nr_walks_decided). spfx_ok 0: the table could not grow; walk. */
    uint64_t *spfx_key;
    uint32_t *spfx_count;
    int64_t spfx_mask, spfx_used;
    int32_t spfx_ok;
    int32_t nr_chain_list;  /* chains in chain_list, or -1 when more than it holds */
    int32_t chain_list[8];
    uint64_t chain_lo[8], chain_hi[8]; /* open range; lo 0 / hi ~0 with no bound there */
    int32_t chain_has[8];   /* bit 0: a lower bound, bit 1: an upper bound */
    uint64_t chain_range_gen; /* stable_gen when the ranges were taken */
    int64_t stable_stale;   /* stable nodes marked stale and not yet freed */
    int64_t nr_walks_decided;
    int32_t root_stable_tree[64];
    int32_t root_unstable_tree[64];
    int32_t migrate_nodes; /* first stable node on the migrate_nodes list */

    /* large folios (owned by C) */
    struct ksm_folio *folios;
    int32_t folios_cap, folios_used, folios_free;

    /* knobs */
    int32_t max_page_sharing;
    int32_t merge_across_nodes;
    int32_t use_zero_pages;
    int32_t smart_scan;
    /* the kernel profile (python/ksmcore/profiles.py): cmp_and_merge_page() checks the
     * checksum before the stable tree (6.11+); break_ksm() unshares KSM zero pages (6.6+) */
    int32_t checksum_first;
    int32_t unshare_zero_pages;
    int32_t ksm_nr_node_ids;
    uint64_t stable_node_chains_prune_millisecs;
    uint64_t jiffies; /* the simulated clock, in ms */
    uint64_t seqnr;   /* ksm_scan.seqnr = full_scans */
    int64_t pending_break_cow; /* a slot whose merge half failed: Python unshares it */

    /* ksmd's batches counted inside ksm_scan_range(), so that one call can run many
     * ksm_do_scan(batch_pages) batches back to back (batch_pages 0: not counted).
     * When a batch is full, a row (KSM_BATCH_LOG_COLS values) goes to batch_log and
     * the clock moves on as ksmd's would: the batch's pages, then the next batch's
     * overhead (unless the call's budget is used up), and jiffies follow. */
    int64_t batch_pages;    /* pages_to_scan */
    int64_t batch_done;     /* pages processed in the current batch */
    int64_t batch_clock_ns; /* the clock while the current batch runs */
    int64_t page_ns, batch_ns; /* CostModel: per page processed, per batch */
    int64_t *batch_log;     /* nr_batch_log rows of the batch log (batch_log_cap at most) */
    int64_t nr_batch_log, batch_log_cap;

    /* tracing: events accumulate while trace_enabled; Python drains them after
     * each call (nr_trace = 0) */
    int32_t trace_enabled;
    struct ksm_trace_event *trace;
    int64_t nr_trace, trace_cap;
    uint32_t zero_checksum;

    /* counters */
    int64_t pages_shared, pages_sharing, pages_unshared, rmap_items;
    int64_t pages_scanned, pages_skipped, ksm_zero_pages;
    int64_t stable_node_chains, stable_node_dups;
    int64_t cow_ksm;
    int64_t thp_split_zero_pages; /* KSM_PTE_SPLIT_ZERO entries (not a sysfs counter) */
    int64_t thp_splits;           /* huge pages split by ksmd or migration */
};

/* checksums and comparison */

/**
 * ksm_xxh64 - XXH64 of len bytes at data with seed (the kernel's xxhash(), which
 * calc_checksum() truncates).
 */
uint64_t ksm_xxh64(const void *data, size_t len, uint64_t seed);
/**
 * calc_checksum - the checksum ksmd keeps per rmap_item: (u32)xxhash(page, 4096, 0).
 * @page: 4096 readable bytes.
 */
uint32_t calc_checksum(const uint8_t *page);
/* which form of calc_checksum() runs: the CPU's best (chosen when the library
 * loads), or one chosen (the tests run both); select returns the form now in use, or
 * -1 if the CPU lacks it. Selecting is not thread-safe: do it before scanning. */
#define KSM_CSUM_BEST -1
#define KSM_CSUM_SCALAR 0
#define KSM_CSUM_AVX512 1
int ksm_checksum_select(int impl);
int ksm_checksum_impl(void);
/**
 * calc_checksums - calc_checksum() of @npages consecutive pages at @pages into @out
 * (npages entries), in one call.
 */
void calc_checksums(const uint8_t *pages, size_t npages, uint32_t *out);
/**
 * ksm_page_hashes - the whole 64-bit XXH64 of each of @npages consecutive pages at
 * @pages into @out (calc_checksum() keeps 32 bits of it): one call for a batch, for
 * telling changed pages apart where 32 bits would collide too often.
 */
void ksm_page_hashes(const uint8_t *pages, size_t npages, uint64_t *out);
/**
 * memcmp_pages - the kernel's memcmp_pages(): <0, 0 or >0 as memcmp() of two pages.
 * Both the stable and the unstable tree are ordered by it.
 */
int memcmp_pages(const uint8_t *a, const uint8_t *b);

/* the red-black tree over index-linked nodes (lib/rbtree.c): @nodes is the node array,
 * links are indices (KSM_NIL: none), @root/@link point at the int32_t that holds the
 * root or the parent's child slot, as rb_link_node()/rb_insert_color() take them.
 * Callers search first (tree order is theirs), then link and recolour. */
void ksm_rb_link_node(struct ksm_rbnode *nodes, int32_t node, int32_t parent, int32_t *link);
void ksm_rb_insert_color(struct ksm_rbnode *nodes, int32_t node, int32_t *root);
void ksm_rb_erase(struct ksm_rbnode *nodes, int32_t node, int32_t *root);
void ksm_rb_replace_node(struct ksm_rbnode *nodes, int32_t victim, int32_t new_node, int32_t *root);
int32_t ksm_rb_first(const struct ksm_rbnode *nodes, int32_t root);
int32_t ksm_rb_next(const struct ksm_rbnode *nodes, int32_t node);

/* the engine's context: C-owned parts */

/**
 * ksm_ctx_init - empty trees and lists, no C-owned storage yet; 0 on success.
 * Python then points the ctx at its arrays and refreshes them after every growth.
 */
int ksm_ctx_init(struct ksm_ctx *c);
/**
 * ksm_ctx_release - free the stable and unstable node storage and the trace buffer.
 */
void ksm_ctx_release(struct ksm_ctx *c);
/**
 * ksm_reserve - make room for @nr_stable more stable nodes and @nr_unstable unstable
 * nodes, so that a ksm_scan_range() of that many pages cannot run out mid-merge (one
 * page needs up to 2 stable nodes, a chain and its dup, and 1 unstable node).
 * Returns 0, or -1 when a tree would pass KSM_MAX_TREE_NODES or memory runs out (the
 * trees are intact; Python raises MemoryError). Call before every batch.
 */
int ksm_reserve(struct ksm_ctx *c, int64_t nr_stable, int64_t nr_unstable);
/**
 * ksm_reserve_batch - ksm_reserve() for a batch of up to @budget pages: C knows what
 * one page can need (2 stable nodes, a chain and its dup, and 1 unstable node), and
 * that a batch cannot pass more pages than there are slots. Same return as
 * ksm_reserve(). Call before every ksm_scan_range() batch.
 */
int ksm_reserve_batch(struct ksm_ctx *c, int64_t budget);

/* frames */

/**
 * ksm_add_frames - put frames [@first, @first + @count) on their node's free list
 * (Python grew the chunk arrays and set chunk_nid first).
 */
void ksm_add_frames(struct ksm_ctx *c, int64_t first, int64_t count);
/**
 * ksm_frame_alloc - take a free frame of node @nid, with mapcount 1 and not KSM;
 * KSM_NIL when the node has none (Python calls Memory.ensure_free() before anything
 * that allocates).
 */
int32_t ksm_frame_alloc(struct ksm_ctx *c, int nid);
/**
 * ksm_map_image - map @n frames from @first_frame at slots [@slot, @slot + @n), each
 * present with mapcount 1 (an image's frames, or a new huge page's).
 */
void ksm_map_image(struct ksm_ctx *c, int64_t slot, int64_t first_frame, int64_t n);
/* frames head..head+511, mapped once each at slots slot..slot+511, become one large
 * folio; returns its index, or -1 when out of memory */
int32_t ksm_make_folio(struct ksm_ctx *c, int64_t slot, int64_t head);
/* split_huge_page() of the folio frame pfn belongs to (nothing if it is small) */
void ksm_split_folio(struct ksm_ctx *c, int64_t pfn);

/**
 * ksm_set_mergeable - VM_MERGEABLE on (@on 1) or off for the pages of slots
 * [@lo, @hi): a change made outside the scan, so the unstable tree's walk rechecks
 * the nodes inserted before it (unstable_tree_disturbed()).
 */
void ksm_set_mergeable(struct ksm_ctx *c, int64_t lo, int64_t hi, int on);

/* faults and mapping changes, over slot ranges [lo, hi) of one mm.
 * Each returns how many new frames it needs, or did use; with dry_run it only counts:
 * Python calls it with dry_run 1, makes that many frames free on every node involved,
 * then calls it again with dry_run 0, which cannot fail. A new frame goes to node
 * @nid, or to nids[slot - lo] when @nids is not NULL (interleave). */

/**
 * ksm_write_fault - a write fault on every page of [@lo, @hi): a missing page gets a
 * zeroed frame, a shared one (KSM page, fork COW, image frame, zero page) a private
 * copy (do_wp_page()); pages in [@full_lo, @full_hi) are about to be overwritten
 * whole, so they are neither zeroed nor copied. Python then copies the data in
 * (ksm_copy_in()).
 */
int64_t ksm_write_fault(struct ksm_ctx *c, int64_t lo, int64_t hi, int nid, const int16_t *nids,
                        int64_t full_lo, int64_t full_hi, int dry_run);
/**
 * ksm_break_ksm - break_ksm() over [@lo, @hi): every KSM page (and KSM zero page)
 * mapped there gets a private copy, as unmerge_ksm_pages() does for MADV_UNMERGEABLE,
 * run=2 and prctl(PR_SET_MEMORY_MERGE, 0).
 */
int64_t ksm_break_ksm(struct ksm_ctx *c, int64_t lo, int64_t hi, int nid, const int16_t *nids,
                      int dry_run);
/* migration: frame old[i] moves to the (allocated) frame new[i]; remap is scratch of
 * nr_frames entries, all -1, left so */
void ksm_migrate_frames(struct ksm_ctx *c, const int32_t *old, const int32_t *new_frames,
                        int64_t n, int32_t *remap);
/**
 * ksm_zap_range - unmap every page of [@lo, @hi) (munmap, MADV_DONTNEED, exit): frames
 * lose a mapping and are freed at 0; rmap_items stay, for ksmd to free as it passes
 * (get_next_rmap_item(), remove_trailing_rmap_items()).
 */
void ksm_zap_range(struct ksm_ctx *c, int64_t lo, int64_t hi);
/**
 * ksm_fork_range - copy_page_range(): slots [@dst, @dst + @n) of mm @child_mm map
 * what [@src, @src + @n) map (every frame gains a mapping, KSM zero PTEs are copied
 * as such); the child has no rmap_items.
 */
void ksm_fork_range(struct ksm_ctx *c, int64_t src, int64_t dst, int64_t n, int32_t child_mm);
/**
 * ksm_copy_in - copy @len bytes from @src into the pages from slot @slot, starting
 * @offset bytes into it. The pages must be present and private (after
 * ksm_write_fault()); marks their checksums stale.
 */
void ksm_copy_in(struct ksm_ctx *c, int64_t slot, size_t offset, const uint8_t *src, size_t len);
/* whole pages src[i] written to slots[i] in order, each a write fault as
 * ksm_write_fault (nids[i] the node of a new frame) then a copy; the caller provides
 * n free frames on every node named; returns the frames used */
int64_t ksm_fill_slots(struct ksm_ctx *c, const int64_t *slots, const int16_t *nids, int64_t n,
                       const uint8_t *src);
/**
 * ksm_copy_out - copy @len bytes of the pages from slot @slot (from @offset) to @dst;
 * a missing page or a zero page reads as zeros. Changes nothing.
 */
void ksm_copy_out(const struct ksm_ctx *c, int64_t slot, size_t offset, uint8_t *dst, size_t len);

/* ksmd */

/**
 * ksm_scan_range - scan_get_next_rmap_item() and cmp_and_merge_page() for the slots of
 * [@lo, @hi), all in one VM_MERGEABLE VMA of one mm, in address order: rmap_items are
 * allocated or freed as pages come and go, smart scan skips, pages merge.
 * @budget: pages to pass to cmp_and_merge_page() at most (pages_to_scan left).
 * @next: set to the first slot not yet visited.
 *
 * Returns the pages passed to cmp_and_merge_page(). Stops early, with *@next after
 * the page, when the budget is used or when a merge was left half done: then
 * c->pending_break_cow names a slot whose page became a KSM page with one mapping,
 * and the caller must unshare it (ksm_break_ksm() over that one slot, after providing
 * a frame on its owner's node) and set pending_break_cow back to KSM_NIL before
 * the next call. Call ksm_reserve() before; drain c->trace after.
 *
 * With c->batch_pages set, the pages count into ksmd's batches as well: each full
 * batch appends a row to c->batch_log (the caller provides room for every batch the
 * budget can fill) and moves c->batch_clock_ns and c->jiffies on.
 */
int64_t ksm_scan_range(struct ksm_ctx *c, int64_t lo, int64_t hi, int64_t budget, int64_t *next);
/**
 * remove_trailing_rmap_items - free the rmap_items of [@lo, @hi), taking them out of the
 * trees: the kernel's for the rest of an mm's rmap_list, here for a run of slots
 * (pages no longer in a VM_MERGEABLE VMA, or in no VMA, as the scan passes; an
 * exited mm's; every mm's at run=2).
 */
void remove_trailing_rmap_items(struct ksm_ctx *c, int64_t lo, int64_t hi);
/**
 * ksm_start_round - the start of a full scan in scan_get_next_rmap_item(): prune the
 * stale migrate_nodes (merge_across_nodes 0) and reset every unstable tree.
 */
void ksm_start_round(struct ksm_ctx *c);
/**
 * ksm_unstable_tree_sync - build the unstable tree's rbtree now if it was deferred
 * (c->ulazy): call before reading c->unode or c->root_unstable_tree. Decides nothing;
 * the rest of the round then walks the rbtree.
 */
void ksm_unstable_tree_sync(struct ksm_ctx *c);
/**
 * ksm_remove_all_stable_nodes - remove_all_stable_nodes(), for a write of
 * merge_across_nodes or max_page_sharing: 0 when every stable node went, -1 (the
 * write's EBUSY) when a KSM page is still mapped; stale nodes are removed either way.
 */
int ksm_remove_all_stable_nodes(struct ksm_ctx *c);

/* memory images that shrink underneath (image_guard.c): while a range is registered,
 * a SIGBUS inside it maps a zero page there and counts a fault against the range
 * instead of killing the process; the caller checks ksm_image_guard_faults(start)
 * after each call that may have read the image (-1: no such range).
 * ksm_image_guard_add returns 0, or -1 when the handler cannot be installed or the
 * table is full; ksm_image_guard_remove forgets the range that starts at start. */
int ksm_image_guard_add(const void *start, size_t len);
void ksm_image_guard_remove(const void *start);
int64_t ksm_image_guard_faults(const void *start);
/* CFFI-END */

#endif /* KSMCORE_H */
