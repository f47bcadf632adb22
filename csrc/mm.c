/*
 * mm.c - the mm side of the C core: what the kernel's mm does to the pages KSM scans.
 *
 * Frames and their free lists, write faults and copy on write (do_wp_page()),
 * break_ksm()'s unsharing, zap (zap_pte_range()), fork (copy_present_ptes()), copies
 * in and out, migration (folio_migrate_ksm()), and large folios (transparent huge
 * pages: split_huge_page()). Every entry point that changes what a page table maps
 * or what a page holds calls unstable_tree_disturbed() first.
 */
#include <stdlib.h>
#include <string.h>

#include "ksm_internal.h"

/* ---------------------------------------------------------------- frames */

void ksm_add_frames(struct ksm_ctx *c, int64_t first, int64_t count)
{
    int nid = frame_nid(c, first);
    /* pushed in reverse so that allocation hands them out in ascending order */
    for (int64_t pfn = first + count - 1; pfn >= first; pfn--) {
        c->frame_mapcount[pfn] = 0;
        c->frame_stable[pfn] = KSM_FREE_LINK(c->free_head[nid]);
        c->free_head[nid] = (int32_t)pfn;
        c->nr_free[nid]++;
    }
}

int32_t ksm_frame_alloc(struct ksm_ctx *c, int nid)
{
    int32_t pfn = c->free_head[nid];
    if (pfn == NIL)
        return NIL;
    c->free_head[nid] = KSM_FREE_NEXT(c->frame_stable[pfn]);
    c->nr_free[nid]--;
    c->frame_mapcount[pfn] = 1;
    c->frame_stable[pfn] = KSM_FRAME_NOT_KSM;
    return pfn;
}

void ksm_set_mergeable(struct ksm_ctx *c, int64_t lo, int64_t hi, int on)
{
    unstable_tree_disturbed(c);
    for (int64_t s = lo; s < hi; s++) {
        if (on)
            c->ri_flags[s] |= KSM_SLOT_VM_MERGEABLE;
        else
            c->ri_flags[s] &= (uint16_t)~KSM_SLOT_VM_MERGEABLE;
    }
}

/* Frames [first_frame, first_frame + n) hold a memory image: map them at slots
 * [slot, slot + n), once each. They are read until written, and never reused. */
void ksm_map_image(struct ksm_ctx *c, int64_t slot, int64_t first_frame, int64_t n)
{
    unstable_tree_disturbed(c);
    for (int64_t i = 0; i < n; i++) {
        int64_t pfn = first_frame + i;
        c->frame_mapcount[pfn] = 1;
        c->frame_stable[pfn] = KSM_FRAME_NOT_KSM;
        c->pte[slot + i] = (int32_t)pfn;
    }
}

/* drop one mapping; the frame is freed with its last one, and a freed KSM
 * frame no longer names its stable node, which is how the node goes stale */
static void free_folio(struct ksm_ctx *c, int32_t f);
static void free_frame(struct ksm_ctx *c, int32_t pfn);

void put_frame(struct ksm_ctx *c, int32_t pfn)
{
    int32_t f = frame_folio(c, pfn);
    if (f >= 0) {
        /* a subpage of a large folio: the folio holds the memory until its last
         * subpage is unmapped (partially mapped folios wait for a split) */
        int32_t mc = --c->frame_mapcount[pfn];
        if (mc == 1)
            c->folios[f].shared--;
        else if (mc == 0 && --c->folios[f].mapped == 0)
            free_folio(c, f);
        return;
    }
    if (--c->frame_mapcount[pfn] > 0)
        return;
    if (c->frame_stable[pfn] >= 0) {
        struct ksm_stable_node *n = &c->stable[c->frame_stable[pfn]];
        if (!n->stale)
            c->stable_stale++; /* a walk passing it now removes it */
        n->stale = 1;
    }
    free_frame(c, pfn);
}

/* ---------------------------------------------------------------- large folios */

static void free_frame(struct ksm_ctx *c, int32_t pfn)
{
    c->frame_stable[pfn] = KSM_FRAME_NOT_KSM;
    if (frame_is_image(c, pfn))
        return; /* the image's memory is not ours */
    int nid = frame_nid(c, pfn);
    c->frame_stable[pfn] = KSM_FREE_LINK(c->free_head[nid]);
    c->free_head[nid] = pfn;
    c->nr_free[nid]++;
}

/* the folio's last subpage went: every frame becomes free (small) memory */
static void free_folio(struct ksm_ctx *c, int32_t f)
{
    struct ksm_folio *fo = &c->folios[f];
    for (int64_t k = 0; k < KSM_HPAGE_PMD_NR; k++) {
        int32_t pfn = (int32_t)(fo->head + k);
        set_frame_folio(c, pfn, -1);
        free_frame(c, pfn);
    }
    fo->nr_maps = 0;
    fo->next_free = c->folios_free;
    c->folios_free = f;
}

static int folio_add_map(struct ksm_ctx *c, int32_t f, int64_t base)
{
    struct ksm_folio *fo = &c->folios[f];
    for (int32_t i = 0; i < fo->nr_maps; i++)
        if (fo->maps[i] == base)
            return 0;
    if (fo->nr_maps == fo->maps_cap) {
        int32_t cap = fo->maps_cap ? 2 * fo->maps_cap : 2;
        int64_t *m = realloc(fo->maps, (size_t)cap * sizeof(*m));
        if (!m)
            return -1;
        fo->maps = m;
        fo->maps_cap = cap;
    }
    fo->maps[fo->nr_maps++] = base;
    return 0;
}

int32_t ksm_make_folio(struct ksm_ctx *c, int64_t slot, int64_t head)
{
    int32_t f = c->folios_free;
    if (f != NIL) {
        c->folios_free = c->folios[f].next_free;
    } else {
        if (c->folios_used == c->folios_cap) {
            int32_t cap = c->folios_cap ? 2 * c->folios_cap : 64;
            struct ksm_folio *n = realloc(c->folios, (size_t)cap * sizeof(*n));
            if (!n)
                return -1;
            c->folios = n;
            c->folios_cap = cap;
        }
        f = c->folios_used++;
        c->folios[f].maps = NULL;
        c->folios[f].maps_cap = 0;
    }
    struct ksm_folio *fo = &c->folios[f];
    fo->head = head;
    fo->nr_maps = 0;
    fo->mapped = KSM_HPAGE_PMD_NR;
    fo->shared = 0;
    fo->next_free = NIL;
    if (folio_add_map(c, f, slot) != 0) {
        fo->next_free = c->folios_free;
        c->folios_free = f;
        return -1;
    }
    for (int64_t k = 0; k < KSM_HPAGE_PMD_NR; k++)
        set_frame_folio(c, head + k, f);
    return f;
}

int page_is_zero(const uint8_t *p)
{
    static const uint8_t zero[KSM_PAGE_SIZE];
    return memcmp(p, zero, KSM_PAGE_SIZE) == 0;
}

/* split_huge_page(): unmap_folio() + remap_page(RMP_USE_SHARED_ZEROPAGE). Every
 * mapping of a zero-filled subpage becomes the shared zero page
 * (try_to_map_unused_to_zeropage(): no mlock or userfaultfd in the model); the other
 * subpages stay mapped as small pages; subpages no longer mapped are freed. */
void split_huge_page(struct ksm_ctx *c, int32_t f)
{
    struct ksm_folio *fo = &c->folios[f];
    int64_t head = fo->head;
    unstable_tree_disturbed(c);
    c->thp_splits++;
    uint8_t zero[KSM_HPAGE_PMD_NR];
    for (int64_t k = 0; k < KSM_HPAGE_PMD_NR; k++)
        zero[k] = c->frame_mapcount[head + k] > 0 && page_is_zero(page_address(c, head + k));
    for (int32_t i = 0; i < fo->nr_maps; i++) {
        int64_t base = fo->maps[i];
        for (int64_t k = 0; k < KSM_HPAGE_PMD_NR; k++) {
            int64_t s = base + k;
            if (!zero[k] || c->pte[s] != head + k)
                continue;
            c->pte[s] = KSM_PTE_SPLIT_ZERO;
            c->ri_flags[s] &= (uint16_t)~KSM_SLOT_CSUM_FRESH;
            c->thp_split_zero_pages++;
            c->mm_thp_split_zero_pages[SLOT_MM(c, s)]++;
            c->frame_mapcount[head + k]--;
        }
    }
    for (int64_t k = 0; k < KSM_HPAGE_PMD_NR; k++) {
        int32_t pfn = (int32_t)(head + k);
        set_frame_folio(c, pfn, -1);
        if (c->frame_mapcount[pfn] == 0)
            free_frame(c, pfn);
    }
    fo->nr_maps = 0;
    fo->next_free = c->folios_free;
    c->folios_free = f;
}

void ksm_split_folio(struct ksm_ctx *c, int64_t pfn)
{
    if (frame_folio(c, pfn) >= 0)
        split_huge_page(c, frame_folio(c, pfn));
}

/* a write to a subpage of a large folio reuses it unless the folio is mapped by
 * another mm too (__wp_can_reuse_large_anon_folio(); do_huge_pmd_wp_page() splits
 * the PMD and falls back to a 4 KiB copy) */
static inline int folio_shared(const struct ksm_ctx *c, int32_t pfn)
{
    int32_t f = frame_folio(c, pfn);
    return f >= 0 && c->folios[f].shared > 0;
}

static void ksm_unmap_split_zero_page(struct ksm_ctx *c, int64_t slot)
{
    c->thp_split_zero_pages--;
    c->mm_thp_split_zero_pages[SLOT_MM(c, slot)]--;
}

static void ksm_unmap_zero_page(struct ksm_ctx *c, int64_t slot)
{
    /* ksm_might_unmap_zero_page() */
    c->ksm_zero_pages--;
    c->mm_zero_pages[SLOT_MM(c, slot)]--;
}

/* A write to [lo, hi): the faults do_anonymous_page() and do_wp_page() take.
 * Pages in [full_lo, full_hi) are overwritten whole, so need no zeroing or copy. */
/* nids, when given, is the node for each page (an interleave policy), else nid */
int64_t ksm_write_fault(struct ksm_ctx *c, int64_t lo, int64_t hi, int nid, const int16_t *nids,
                        int64_t full_lo, int64_t full_hi, int dry_run)
{
    unstable_tree_disturbed(c);
    int64_t used = 0;
    for (int64_t s = lo; s < hi; s++) {
        int32_t p = c->pte[s];
        int whole = s >= full_lo && s < full_hi;
        if (p >= 0 && !frame_is_ksm(c, p) && c->frame_mapcount[p] == 1 &&
            !frame_is_image(c, p) && !folio_shared(c, p))
            continue; /* exclusive anonymous page: written in place */
        used++;
        if (dry_run)
            continue;
        int32_t n = ksm_frame_alloc(c, nids ? nids[s - lo] : nid);
        if (p < 0) {
            if (!whole)
                memset(page_address(c, n), 0, KSM_PAGE_SIZE);
            if (p == KSM_PTE_ZERO)
                ksm_unmap_zero_page(c, s);
            else if (p == KSM_PTE_SPLIT_ZERO)
                ksm_unmap_split_zero_page(c, s);
        } else {
            /* COW of a KSM page or of a page shared since fork */
            if (!whole)
                memcpy(page_address(c, n), page_address(c, p), KSM_PAGE_SIZE);
            if (frame_is_ksm(c, p))
                c->cow_ksm++;
            put_frame(c, p);
        }
        c->pte[s] = n;
    }
    return used;
}

/* break_ksm() over [lo, hi): unshare every KSM page and KSM zero page */
int64_t ksm_break_ksm(struct ksm_ctx *c, int64_t lo, int64_t hi, int nid, const int16_t *nids,
                      int dry_run)
{
    unstable_tree_disturbed(c);
    int64_t used = 0;
    for (int64_t s = lo; s < hi; s++) {
        int32_t p = c->pte[s];
        if (p == KSM_PTE_NONE || p == KSM_PTE_SPLIT_ZERO || (p >= 0 && !frame_is_ksm(c, p)))
            continue;
        if (p == KSM_PTE_ZERO && !c->unshare_zero_pages)
            continue; /* before 6.6 break_ksm() left KSM-placed zero pages mapped */
        used++;
        if (dry_run)
            continue;
        int32_t n = ksm_frame_alloc(c, nids ? nids[s - lo] : nid);
        if (p == KSM_PTE_ZERO) {
            memset(page_address(c, n), 0, KSM_PAGE_SIZE);
            ksm_unmap_zero_page(c, s);
        } else {
            memcpy(page_address(c, n), page_address(c, p), KSM_PAGE_SIZE);
            put_frame(c, p);
        }
        c->pte[s] = n;
    }
    return used;
}

/* The migration core (migrate_pages): contents move to the new frame and every PTE
 * follows. For a KSM page, folio_migrate_ksm(): the stable node's kpfn follows too,
 * its nid does not, so it may now sit in the wrong node's tree. */
void ksm_migrate_frames(struct ksm_ctx *c, const int32_t *old, const int32_t *new_frames,
                        int64_t n, int32_t *remap)
{
    unstable_tree_disturbed(c);
    for (int64_t i = 0; i < n; i++) {
        int32_t o = old[i], w = new_frames[i];
        memcpy(page_address(c, w), page_address(c, o), KSM_PAGE_SIZE);
        c->frame_mapcount[w] = c->frame_mapcount[o];
        int32_t node = c->frame_stable[o];
        c->frame_stable[w] = node;
        if (node >= 0) {
            c->stable[node].kpfn = w;
            c->stable[node].migrated = 1;
        }
        remap[o] = w;
    }
    for (int64_t s = 0; s < c->nr_slots; s++) {
        int32_t p = c->pte[s];
        if (p > 0 && remap[p] >= 0)
            c->pte[s] = remap[p];
    }
    for (int64_t i = 0; i < n; i++) {
        int32_t o = old[i];
        remap[o] = -1;
        c->frame_stable[o] = KSM_FRAME_NOT_KSM; /* the old folio's mapping is cleared */
        c->frame_mapcount[o] = 1;
        put_frame(c, o);
    }
}

void ksm_zap_range(struct ksm_ctx *c, int64_t lo, int64_t hi)
{
    unstable_tree_disturbed(c);
    for (int64_t s = lo; s < hi; s++) {
        int32_t p = c->pte[s];
        if (p == KSM_PTE_ZERO)
            ksm_unmap_zero_page(c, s);
        else if (p == KSM_PTE_SPLIT_ZERO)
            ksm_unmap_split_zero_page(c, s);
        else if (p >= 0)
            put_frame(c, p);
        c->pte[s] = KSM_PTE_NONE;
        c->ri_flags[s] &= (uint16_t)~(KSM_SLOT_VM_MERGEABLE | KSM_SLOT_CSUM_FRESH);
    }
}

void ksm_fork_range(struct ksm_ctx *c, int64_t src, int64_t dst, int64_t n, int32_t child_mm)
{
    unstable_tree_disturbed(c);
    for (int64_t i = 0; i < n; i++) {
        int32_t p = c->pte[src + i];
        c->pte[dst + i] = p;
        c->ri_flags[dst + i] = c->ri_flags[src + i] & KSM_SLOT_VM_MERGEABLE;
        if (p == KSM_PTE_ZERO) {
            /* the child's zero PTEs add to the global count (ksm_fork) */
            c->ksm_zero_pages++;
            c->mm_zero_pages[child_mm]++;
        } else if (p == KSM_PTE_SPLIT_ZERO) {
            c->thp_split_zero_pages++;
            c->mm_thp_split_zero_pages[child_mm]++;
        } else if (p >= 0) {
            int32_t f = frame_folio(c, p);
            if (++c->frame_mapcount[p] == 2 && f >= 0)
                c->folios[f].shared++;
            if (f >= 0) /* copy_huge_pmd() / copy_present_ptes(): the child maps it too */
                folio_add_map(c, f, dst + i - (p - c->folios[f].head));
        }
    }
}

void ksm_copy_in(struct ksm_ctx *c, int64_t slot, size_t offset, const uint8_t *src, size_t len)
{
    unstable_tree_disturbed(c);
    while (len) {
        size_t n = KSM_PAGE_SIZE - offset;
        if (n > len)
            n = len;
        memcpy(page_address(c, c->pte[slot]) + offset, src, n);
        c->ri_flags[slot] &= (uint16_t)~KSM_SLOT_CSUM_FRESH; /* the contents changed */
        src += n;
        len -= n;
        offset = 0;
        slot++;
    }
}

int64_t ksm_fill_slots(struct ksm_ctx *c, const int64_t *slots, const int16_t *nids, int64_t n,
                       const uint8_t *src)
{
    int64_t used = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t s = slots[i];
        used += ksm_write_fault(c, s, s + 1, nids[i], NULL, s, s + 1, 0);
        ksm_copy_in(c, s, 0, src + (size_t)i * KSM_PAGE_SIZE, KSM_PAGE_SIZE);
    }
    return used;
}

void ksm_copy_out(const struct ksm_ctx *c, int64_t slot, size_t offset, uint8_t *dst, size_t len)
{
    while (len) {
        size_t n = KSM_PAGE_SIZE - offset;
        if (n > len)
            n = len;
        int32_t p = c->pte[slot];
        if (p >= 0)
            memcpy(dst, page_address(c, p) + offset, n);
        else
            memset(dst, 0, n); /* not present, or the zero page */
        dst += n;
        len -= n;
        offset = 0;
        slot++;
    }
}
