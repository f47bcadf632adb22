/*
 * ksm_internal.h - what the two halves of the C core share: ksm.c (ksmd: the trees,
 * the scan, the merge) and mm.c (the mm: faults, COW, zap, fork, copies, migration,
 * huge pages). Inline views of struct ksm_ctx, and the functions one half calls in
 * the other. Not part of the API: ksmcore.h is.
 */
#ifndef KSM_INTERNAL_H
#define KSM_INTERNAL_H

#include "ksmcore.h"

#define NIL KSM_NIL

static inline uint8_t *page_address(const struct ksm_ctx *c, int64_t pfn)
{
    int64_t mask = ((int64_t)1 << c->chunk_shift) - 1;
    return c->chunks[pfn >> c->chunk_shift] + ((size_t)(pfn & mask) << 12);
}

/* the large folio of a frame, or -1 (frame_folio[] keeps it + 1) */
static inline int32_t frame_folio(const struct ksm_ctx *c, int64_t pfn)
{
    return c->frame_folio[pfn] - 1;
}

static inline void set_frame_folio(struct ksm_ctx *c, int64_t pfn, int32_t f)
{
    c->frame_folio[pfn] = f + 1;
}

static inline int frame_nid(const struct ksm_ctx *c, int64_t pfn)
{
    return c->chunk_nid[pfn >> c->chunk_shift];
}

static inline int frame_is_image(const struct ksm_ctx *c, int64_t pfn)
{
    return c->chunk_flags[pfn >> c->chunk_shift] & KSM_CHUNK_IMAGE;
}

/* the mm a slot belongs to: VMAs get slots from a block boundary, so blocks have one mm */
#define SLOT_MM(c, s) ((c)->slot_mm[(s) >> KSM_SLOT_BLOCK_SHIFT])

/* a free frame's frame_stable links the free list (values below KSM_FRAME_KSM_NULL) */
#define KSM_FREE_LINK(next) (-(next)-4)
#define KSM_FREE_NEXT(v) (-(v)-4)

static inline int get_kpfn_nid(const struct ksm_ctx *c, int64_t kpfn)
{
    return c->merge_across_nodes ? 0 : frame_nid(c, kpfn);
}

static inline int frame_is_ksm(const struct ksm_ctx *c, int32_t pfn)
{
    return c->frame_stable[pfn] != KSM_FRAME_NOT_KSM;
}

/* ksm.c: something outside the scan changes pages, mappings or VMA flags (see
 * uquiet_from); a deferred unstable tree is built first, from the pages as they were */
void unstable_tree_disturbed(struct ksm_ctx *c);

/* mm.c: a frame loses a mapping (freed with its last; a freed KSM frame leaves its
 * stable node stale), a huge page is split (zero-filled subpages to the shared zero
 * page), and the test for a zero-filled page */
void put_frame(struct ksm_ctx *c, int32_t pfn);
void split_huge_page(struct ksm_ctx *c, int32_t f);
int page_is_zero(const uint8_t *p);

#endif /* KSM_INTERNAL_H */
