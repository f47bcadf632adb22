/*
 * ksm.c - the scanning half of mm/ksm.c over the arrays of struct ksm_ctx.
 *
 * Function names are the kernel's.  One call of ksm_scan_range() runs
 * scan_get_next_rmap_item()'s page walk and cmp_and_merge_page() for a whole run
 * of slots of one VMA, so Python is called once per VMA and batch, not per page.
 * The model has no GUP pins, swap or allocation failures (ksm_reserve()
 * guarantees the nodes a batch can need), so write_protect_page() and friends
 * succeed whenever the kernel's logic lets them. Transparent huge pages are
 * large folios (struct ksm_folio) that try_to_merge_one_page() splits. What the mm
 * does to pages (faults, COW, zap, fork, migration, splits) is in mm.c.
 */
#include <stdlib.h>
#include <string.h>

#include "ksm_internal.h"

/* a tree node's parent index is packed with its colour: (parent + 1) << 1 must fit */
#define KSM_MAX_TREE_NODES (((int64_t)1 << 30) - 1)

_Static_assert(sizeof(struct ksm_stable_node) == 64, "a stable node is one cache line");

/* the first 8 bytes as a big-endian number: comparing two of these is memcmp order */
static inline uint64_t page_prefix(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = (v << 8) | p[i];
    return v;
}

/* ---------------------------------------------------------------- tracing */

static void trace_event(struct ksm_ctx *c, int32_t event, int64_t kpfn, int64_t pfn,
                        int64_t slot, int32_t err)
{
    if (!c->trace_enabled)
        return;
    if (c->nr_trace == c->trace_cap) {
        int64_t cap = c->trace_cap ? 2 * c->trace_cap : 1024;
        struct ksm_trace_event *t = realloc(c->trace, (size_t)cap * sizeof(*t));
        if (!t)
            return; /* like a full trace ring: the event is lost, nothing else is */
        c->trace = t;
        c->trace_cap = cap;
    }
    struct ksm_trace_event *e = &c->trace[c->nr_trace++];
    e->event = event;
    e->err = err;
    e->kpfn = kpfn;
    e->pfn = pfn;
    e->slot = slot;
}

/* ---------------------------------------------------------------- context */

int ksm_ctx_init(struct ksm_ctx *c)
{
    for (int i = 0; i < KSM_MAX_NUMNODES; i++) {
        c->root_stable_tree[i] = NIL;
        c->root_unstable_tree[i] = NIL;
        c->free_head[i] = NIL;
        c->nr_free[i] = 0;
    }
    c->migrate_nodes = NIL;
    c->pending_break_cow = NIL;
    c->trace_enabled = 0;
    c->trace = NULL;
    c->nr_trace = c->trace_cap = 0;
    c->stable = NULL;
    c->stable_rb = NULL;
    c->stable_cap = c->stable_used = 0;
    c->stable_free = NIL;
    c->unode = NULL;
    c->uslot = NULL;
    c->unid = NULL;
    c->uprefix = NULL;
    c->ucap = c->ucount = 0;
    c->uquiet_from = 0;
    c->unstable_lazy = 1;
    c->ulazy = 0;
    c->ulog = NULL;
    c->nr_ulog = c->ulog_cap = 0;
    c->uhash = NULL;
    c->utag = NULL;
    c->uhash_mask = -1;
    c->uhash_filled = c->uhash_entries = 0;
    c->stable_gen = 0;
    c->scan_shortcuts = 1;
    c->nr_prefix_recorded = 0;
    c->spfx_key = NULL;
    c->spfx_count = NULL;
    c->spfx_mask = -1;
    c->spfx_used = 0;
    c->spfx_ok = 1;
    c->nr_chain_list = 0;
    c->chain_range_gen = UINT64_MAX;
    c->stable_stale = 0;
    c->nr_walks_decided = 0;
    c->folios = NULL;
    c->folios_cap = c->folios_used = 0;
    c->folios_free = NIL;
    c->zero_checksum = 0; /* set by Python from calc_checksum of the zero page */
    return ksm_reserve(c, 64, 64);
}

void ksm_ctx_release(struct ksm_ctx *c)
{
    for (int32_t i = 0; i < c->folios_used; i++)
        free(c->folios[i].maps);
    free(c->folios);
    c->folios = NULL;
    c->folios_cap = c->folios_used = 0;
    c->folios_free = NIL;
    free(c->stable);
    free(c->stable_rb);
    free(c->trace);
    c->trace = NULL;
    c->nr_trace = c->trace_cap = 0;
    free(c->unode);
    free(c->uslot);
    free(c->unid);
    free(c->uprefix);
    free(c->ulog);
    free(c->uhash);
    free(c->utag);
    c->ulog = NULL;
    c->uhash = NULL;
    c->utag = NULL;
    c->uhash_mask = -1;
    c->uhash_filled = c->uhash_entries = 0;
    free(c->spfx_key);
    free(c->spfx_count);
    c->spfx_key = NULL;
    c->spfx_count = NULL;
    c->spfx_mask = -1;
    c->spfx_used = 0;
    c->ulazy = 0;
    c->nr_ulog = c->ulog_cap = 0;
    c->stable = NULL;
    c->stable_rb = NULL;
    c->unode = NULL;
    c->uslot = NULL;
    c->unid = NULL;
    c->uprefix = NULL;
    c->stable_cap = c->ucap = 0;
}

/* ------------------------------------------------- the unstable tree, deferred */

static inline int64_t uhash_index(const struct ksm_ctx *c, uint32_t checksum, int nid)
{
    /* the checksum is a hash already; the nid spreads the trees of other nodes */
    return (int64_t)((checksum ^ ((uint32_t)nid * 0x9E3779B9u)) & (uint64_t)c->uhash_mask);
}

/* tn is a node of this round still in the tree (not erased) */
static inline int unstable_node_live(const struct ksm_ctx *c, int32_t tn)
{
    int32_t t = c->uslot[tn];
    return (c->ri_flags[t] & KSM_UNSTABLE_FLAG) && c->ri_head[t] == tn;
}

static inline uint8_t uhash_tag(uint32_t checksum)
{
    return (uint8_t)(checksum >> 24); /* the index is taken from the low bits */
}

/* tn into bucket h (empty, found by probing from tn's checksum's index) */
static inline void uhash_set(struct ksm_ctx *c, int64_t h, int32_t tn)
{
    c->uhash[h] = (uint32_t)tn + 1;
    c->utag[h] = uhash_tag(c->ri_oldchecksum[c->uslot[tn]]);
    c->uhash_filled = tn + 1;
    c->uhash_entries++;
}

static void uhash_add(struct ksm_ctx *c, int32_t tn)
{
    int64_t h = uhash_index(c, c->ri_oldchecksum[c->uslot[tn]], c->unid[tn]);
    while (c->uhash[h])
        h = (h + 1) & c->uhash_mask;
    uhash_set(c, h, tn);
}

/* An empty table for a new round. A round that filled a small part of a large table
 * takes its nodes out one by one, newest first: each was placed past the buckets
 * its elders filled, so its own probe still finds it; memset would touch every page
 * of a table sized for the whole address space. The tags stay: an empty bucket's tag
 * is never read. */
static void uhash_clear(struct ksm_ctx *c)
{
    int64_t buckets = c->uhash_mask + 1;
    if ((int64_t)c->uhash_filled * 16 < buckets) {
        for (int32_t tn = c->uhash_filled - 1; tn >= 0 && c->uhash_entries; tn--) {
            int64_t h = uhash_index(c, c->ri_oldchecksum[c->uslot[tn]], c->unid[tn]);
            while (c->uhash[h] && c->uhash[h] != (uint32_t)tn + 1)
                h = (h + 1) & c->uhash_mask;
            if (c->uhash[h]) { /* else not in the table: erased before a rebuild */
                c->uhash[h] = 0;
                c->uhash_entries--;
            }
        }
    }
    /* a node not found (its slot's checksum changed since: the slot was freed and
     * used again within the round) is left to memset */
    if (c->uhash_entries)
        memset(c->uhash, 0, (size_t)buckets * sizeof(*c->uhash));
    c->uhash_filled = c->uhash_entries = 0;
}

/* a new, larger table: every live node of the round (a deferred one), by checksum */
static int uhash_alloc(struct ksm_ctx *c, int64_t buckets)
{
    uint32_t *hash = calloc((size_t)buckets, sizeof(*hash));
    uint8_t *tag = malloc((size_t)buckets);
    if (!hash || !tag) {
        free(hash);
        free(tag);
        return -1;
    }
    free(c->uhash);
    free(c->utag);
    c->uhash = hash;
    c->utag = tag;
    c->uhash_mask = buckets - 1;
    c->uhash_filled = c->uhash_entries = 0;
    if (c->ulazy)
        for (int32_t tn = 0; tn < c->ucount; tn++)
            if (unstable_node_live(c, tn))
                uhash_add(c, tn);
    return 0;
}

int ksm_reserve(struct ksm_ctx *c, int64_t nr_stable, int64_t nr_unstable)
{
    /* stable nodes in use plus those on the free list count as available */
    int64_t need = (int64_t)c->stable_used + nr_stable;
    if (need > c->stable_cap) {
        int64_t cap = c->stable_cap ? c->stable_cap : 64;
        while (cap < need)
            cap *= 2;
        if (cap > KSM_MAX_TREE_NODES)
            return -1;
        /* cache-line aligned, so that a node is one line (realloc aligns to 16) */
        struct ksm_stable_node *s = aligned_alloc(64, (size_t)cap * sizeof(*s));
        if (!s)
            return -1;
        if (c->stable_cap)
            memcpy(s, c->stable, (size_t)c->stable_cap * sizeof(*s));
        free(c->stable);
        c->stable = s;
        struct ksm_rbnode *r = realloc(c->stable_rb, (size_t)cap * sizeof(*r));
        if (!r)
            return -1;
        c->stable_rb = r;
        c->stable_cap = (int32_t)cap;
    }
    need = (int64_t)c->ucount + nr_unstable;
    if (need > c->ucap) {
        /* straight to what a round over every slot takes: growing by doubling would
         * copy the arrays and rehash the round's nodes each time (the memory not used
         * yet is not touched) */
        int64_t cap = c->ucap ? c->ucap : 64;
        while (cap < need || cap < c->nr_slots)
            cap *= 2;
        if (cap > KSM_MAX_TREE_NODES)
            return -1;
        struct ksm_rbnode *u = realloc(c->unode, (size_t)cap * sizeof(*u));
        if (!u)
            return -1;
        c->unode = u;
        int32_t *s = realloc(c->uslot, (size_t)cap * sizeof(*s));
        if (!s)
            return -1;
        c->uslot = s;
        int16_t *nid = realloc(c->unid, (size_t)cap * sizeof(*nid));
        if (!nid)
            return -1;
        c->unid = nid;
        uint64_t *pfx = realloc(c->uprefix, (size_t)cap * sizeof(*pfx));
        if (!pfx)
            return -1;
        c->uprefix = pfx;
        if (uhash_alloc(c, cap * 2) != 0)
            return -1;
        c->ucap = (int32_t)cap;
    }
    return 0;
}

/* Something outside the scan changes pages, mappings or VMA flags: the unstable tree
 * nodes inserted so far lose their quiet status (see uquiet_from) */
static void unstable_tree_build(struct ksm_ctx *c);

void unstable_tree_disturbed(struct ksm_ctx *c)
{
    if (c->ulazy)
        unstable_tree_build(c); /* before the change: the pages are as they were */
    c->uquiet_from = c->ucount;
}

void ksm_unstable_tree_sync(struct ksm_ctx *c)
{
    if (c->ulazy)
        unstable_tree_build(c);
}

int ksm_reserve_batch(struct ksm_ctx *c, int64_t budget)
{
    int64_t n = (budget < c->nr_slots ? budget : c->nr_slots) + 1;
    return ksm_reserve(c, 2 * n, n);
}

/* ---------------------------------------------------------------- stable nodes */

static int32_t alloc_stable_node(struct ksm_ctx *c)
{
    int32_t i;
    if (c->stable_free != NIL) {
        i = c->stable_free;
        c->stable_free = c->stable[i].next;
    } else {
        i = c->stable_used++; /* capacity guaranteed by ksm_reserve() */
    }
    struct ksm_stable_node *n = &c->stable[i];
    n->kpfn = NIL;
    n->stale = 0;
    n->prefix = 0;
    n->chain_prune_time = 0;
    n->hlist = NIL;
    n->rmap_hlist_len = 0;
    n->head = KSM_HEAD_TREE;
    n->chain = NIL;
    n->next = n->prev = NIL;
    n->nid = 0;
    n->migrated = 0;
    c->stable_rb[i].left = c->stable_rb[i].right = NIL;
    c->stable_rb[i].parent_color = 0; /* no parent, red */
    return i;
}

static void free_stable_node(struct ksm_ctx *c, int32_t i)
{
    if (c->stable[i].stale)
        c->stable_stale--;
    c->stable[i].stale = 0;
    c->stable[i].head = KSM_HEAD_FREE;
    c->stable[i].next = c->stable_free;
    c->stable_free = i;
}

static inline int is_stable_node_chain(const struct ksm_ctx *c, int32_t i)
{
    return c->stable[i].rmap_hlist_len == KSM_STABLE_NODE_CHAIN;
}

static inline int is_stable_node_dup(const struct ksm_ctx *c, int32_t i)
{
    return c->stable[i].head == KSM_HEAD_DUP;
}

static inline int __is_page_sharing_candidate(const struct ksm_ctx *c, int32_t i, int offset)
{
    /* a node with no rmap_items is no candidate: its page will soon be freed */
    int32_t len = c->stable[i].rmap_hlist_len;
    return len && len + offset < c->max_page_sharing;
}

static inline int is_page_sharing_candidate(const struct ksm_ctx *c, int32_t i)
{
    return __is_page_sharing_candidate(c, i, 0);
}

/* migrate_nodes: list_add() puts a node at the front */
/* ------------------------------------- the prefixes of the stable trees' nodes */

static inline int64_t spfx_home(const struct ksm_ctx *c, uint64_t key)
{
    key ^= key >> 33; /* prefixes are page contents, not hashes: mix them */
    key *= 0xff51afd7ed558ccdULL;
    key ^= key >> 33;
    return (int64_t)(key & (uint64_t)c->spfx_mask);
}

/* the bucket holding key, or the empty one where it would go */
static inline int64_t spfx_find(const struct ksm_ctx *c, uint64_t key)
{
    int64_t h = spfx_home(c, key);
    while (c->spfx_count[h] && c->spfx_key[h] != key)
        h = (h + 1) & c->spfx_mask;
    return h;
}

static int spfx_grow(struct ksm_ctx *c)
{
    int64_t old = c->spfx_mask + 1, buckets = old ? 2 * old : 64;
    uint64_t *key = malloc((size_t)buckets * sizeof(*key));
    uint32_t *count = calloc((size_t)buckets, sizeof(*count));
    if (!key || !count) {
        free(key);
        free(count);
        return -1;
    }
    uint64_t *old_key = c->spfx_key;
    uint32_t *old_count = c->spfx_count;
    c->spfx_key = key;
    c->spfx_count = count;
    c->spfx_mask = buckets - 1;
    for (int64_t i = 0; i < old; i++) {
        if (old_count[i]) {
            int64_t h = spfx_find(c, old_key[i]);
            c->spfx_key[h] = old_key[i];
            c->spfx_count[h] = old_count[i];
        }
    }
    free(old_key);
    free(old_count);
    return 0;
}

static void spfx_add(struct ksm_ctx *c, uint64_t key)
{
    if (!c->spfx_ok)
        return;
    if ((c->spfx_used + 1) * 2 > c->spfx_mask + 1 && spfx_grow(c) != 0) {
        c->spfx_ok = 0; /* no memory: walk, and rebuild at the next round */
        return;
    }
    int64_t h = spfx_find(c, key);
    if (!c->spfx_count[h]) {
        c->spfx_key[h] = key;
        c->spfx_used++;
    }
    c->spfx_count[h]++;
}

static void spfx_del(struct ksm_ctx *c, uint64_t key)
{
    if (!c->spfx_ok)
        return;
    int64_t i = spfx_find(c, key);
    if (!c->spfx_count[i]) {
        c->spfx_ok = 0; /* cannot happen; if it did, stop trusting the table */
        return;
    }
    if (--c->spfx_count[i])
        return;
    c->spfx_used--;
    /* backward-shift deletion: move up each later entry of the run that may live
     * here, so that no search stops short at the hole */
    for (int64_t j = i;;) {
        j = (j + 1) & c->spfx_mask;
        if (!c->spfx_count[j])
            break;
        int64_t k = spfx_home(c, c->spfx_key[j]);
        if (i <= j ? (i < k && k <= j) : (i < k || k <= j))
            continue; /* its home is after the hole: it stays */
        c->spfx_key[i] = c->spfx_key[j];
        c->spfx_count[i] = c->spfx_count[j];
        c->spfx_count[j] = 0;
        i = j;
    }
}

/* the table again from the trees (a new round after it could not grow) */
static void spfx_rebuild(struct ksm_ctx *c)
{
    if (c->spfx_mask >= 0)
        memset(c->spfx_count, 0, (size_t)(c->spfx_mask + 1) * sizeof(*c->spfx_count));
    c->spfx_used = 0;
    c->spfx_ok = 1;
    for (int nid = 0; nid < KSM_MAX_NUMNODES; nid++)
        for (int32_t i = ksm_rb_first(c->stable_rb, c->root_stable_tree[nid]); i != NIL;
             i = ksm_rb_next(c->stable_rb, i))
            spfx_add(c, c->stable[i].prefix);
}

/* chain_list: the chains linked in the trees, while there are few */
static void chain_list_add(struct ksm_ctx *c, int32_t chain)
{
    int32_t n = c->nr_chain_list;
    if (n < 0)
        return;
    if (n == (int32_t)(sizeof(c->chain_list) / sizeof(c->chain_list[0]))) {
        c->nr_chain_list = -1; /* too many to test: walk while chains remain */
        return;
    }
    c->chain_list[n] = chain;
    c->nr_chain_list = n + 1;
}

static void chain_list_del(struct ksm_ctx *c, int32_t chain)
{
    if (c->nr_chain_list < 0) {
        if (!c->stable_node_chains)
            c->nr_chain_list = 0;
        return;
    }
    for (int32_t i = 0; i < c->nr_chain_list; i++) {
        if (c->chain_list[i] == chain) {
            c->chain_list[i] = c->chain_list[--c->nr_chain_list];
            return;
        }
    }
}

/* The open range of prefixes whose walk passes each listed chain: bounded by its
 * nearest ancestor on either side (a walk goes right of a node it is above) */
static void chain_ranges(struct ksm_ctx *c)
{
    const struct ksm_rbnode *rb = c->stable_rb;
    for (int32_t i = 0; i < c->nr_chain_list; i++) {
        int32_t x = c->chain_list[i];
        int32_t has = 0;
        uint64_t lo = 0, hi = ~(uint64_t)0;
        for (int32_t p = (rb[x].parent_color >> 1) - 1; p != NIL && has != 3;
             x = p, p = (rb[p].parent_color >> 1) - 1) {
            if (rb[p].right == x && !(has & 1)) {
                lo = c->stable[p].prefix;
                has |= 1;
            } else if (rb[p].left == x && !(has & 2)) {
                hi = c->stable[p].prefix;
                has |= 2;
            }
        }
        c->chain_lo[i] = lo;
        c->chain_hi[i] = hi;
        c->chain_has[i] = has;
    }
    c->chain_range_gen = c->stable_gen;
}

/* 1 when the walk of a page of prefix pfx that is no KSM page is decided before it
 * starts: no node linked in a tree has that prefix (so every comparison is by
 * prefix), no chain is on its path, no node is stale: it finds nothing and changes
 * nothing, as stable_tree_search() would */
static int stable_walk_decided(struct ksm_ctx *c, uint64_t pfx)
{
    if (!c->scan_shortcuts || !c->spfx_ok || c->stable_stale || c->nr_chain_list < 0 ||
        c->spfx_mask < 0)
        return 0;
    if (c->spfx_count[spfx_find(c, pfx)])
        return 0;
    if (c->nr_chain_list) {
        if (c->chain_range_gen != c->stable_gen)
            chain_ranges(c);
        for (int32_t i = 0; i < c->nr_chain_list; i++)
            if ((!(c->chain_has[i] & 1) || pfx > c->chain_lo[i]) &&
                (!(c->chain_has[i] & 2) || pfx < c->chain_hi[i]))
                return 0;
    }
    return 1;
}

/* The stable tree's rbtree operations. Each one can change what a walk finds, so it
 * keeps spfx, and moves stable_gen (the chains' ranges are taken again). */
static inline void stable_rb_erase(struct ksm_ctx *c, int32_t node, int32_t *root)
{
    c->stable_gen++;
    spfx_del(c, c->stable[node].prefix);
    ksm_rb_erase(c->stable_rb, node, root);
}

static inline void stable_rb_replace(struct ksm_ctx *c, int32_t old, int32_t new_node,
                                     int32_t *root)
{
    c->stable_gen++;
    spfx_del(c, c->stable[old].prefix);
    spfx_add(c, c->stable[new_node].prefix);
    ksm_rb_replace_node(c->stable_rb, old, new_node, root);
}

static inline void stable_rb_insert(struct ksm_ctx *c, int32_t node, int32_t parent,
                                    int32_t *link, int32_t *root)
{
    c->stable_gen++;
    spfx_add(c, c->stable[node].prefix);
    ksm_rb_link_node(c->stable_rb, node, parent, link);
    ksm_rb_insert_color(c->stable_rb, node, root);
}

static void migrate_list_add(struct ksm_ctx *c, int32_t i)
{
    struct ksm_stable_node *n = &c->stable[i];
    n->head = KSM_HEAD_MIGRATE;
    n->prev = NIL;
    n->next = c->migrate_nodes;
    if (c->migrate_nodes != NIL)
        c->stable[c->migrate_nodes].prev = i;
    c->migrate_nodes = i;
}

static void migrate_list_del(struct ksm_ctx *c, int32_t i)
{
    struct ksm_stable_node *n = &c->stable[i];
    if (n->prev != NIL)
        c->stable[n->prev].next = n->next;
    else
        c->migrate_nodes = n->next;
    if (n->next != NIL)
        c->stable[n->next].prev = n->prev;
    n->next = n->prev = NIL;
}

static void stable_node_chain_add_dup(struct ksm_ctx *c, int32_t dup, int32_t chain)
{
    /* hlist_add_head(&dup->hlist_dup, &chain->hlist) */
    struct ksm_stable_node *d = &c->stable[dup];
    d->head = KSM_HEAD_DUP;
    d->chain = chain;
    d->prev = NIL;
    d->next = c->stable[chain].hlist;
    if (d->next != NIL)
        c->stable[d->next].prev = dup;
    c->stable[chain].hlist = dup;
    c->stable_node_dups++;
}

static void chain_hlist_del(struct ksm_ctx *c, int32_t dup)
{
    struct ksm_stable_node *d = &c->stable[dup];
    if (d->prev != NIL)
        c->stable[d->prev].next = d->next;
    else
        c->stable[d->chain].hlist = d->next;
    if (d->next != NIL)
        c->stable[d->next].prev = d->prev;
    d->next = d->prev = NIL;
}

static void __stable_node_dup_del(struct ksm_ctx *c, int32_t dup)
{
    chain_hlist_del(c, dup);
    c->stable_node_dups--;
}

static void stable_node_dup_del(struct ksm_ctx *c, int32_t dup)
{
    if (is_stable_node_dup(c, dup))
        __stable_node_dup_del(c, dup);
    else
        stable_rb_erase(c, dup, &c->root_stable_tree[c->stable[dup].nid]);
}

static int32_t alloc_stable_node_chain(struct ksm_ctx *c, int32_t dup, int32_t *root)
{
    int32_t chain = alloc_stable_node(c);
    struct ksm_stable_node *ch = &c->stable[chain];
    ch->chain_prune_time = c->jiffies;
    ch->rmap_hlist_len = KSM_STABLE_NODE_CHAIN;
    ch->nid = c->stable[dup].nid;
    ch->prefix = c->stable[dup].prefix;
    c->stable_node_chains++;
    chain_list_add(c, chain);
    /* the chain takes the old node's place in the tree, the node goes under it */
    stable_rb_replace(c, dup, chain, root);
    stable_node_chain_add_dup(c, dup, chain);
    return chain;
}

static void free_stable_node_chain(struct ksm_ctx *c, int32_t chain, int32_t *root)
{
    stable_rb_erase(c, chain, root);
    free_stable_node(c, chain);
    c->stable_node_chains--;
    chain_list_del(c, chain);
}

static inline void rmap_item_clear_flags(struct ksm_ctx *c, int64_t s)
{
    /* rmap_item->address &= PAGE_MASK */
    c->ri_flags[s] &= KSM_ITEM_EXISTS | KSM_SLOT_VM_MERGEABLE | KSM_SLOT_CSUM_FRESH;
}

static void remove_node_from_stable_tree(struct ksm_ctx *c, int32_t node)
{
    struct ksm_stable_node *n = &c->stable[node];
    for (int32_t s = n->hlist; s != NIL; s = c->ri_hnext[s]) {
        if (c->ri_hnext[s] != NIL) {
            c->pages_sharing--;
            trace_event(c, KSM_TRACE_REMOVE_RMAP_ITEM, NIL, n->kpfn, s, 0);
        } else {
            c->pages_shared--;
        }
        c->mm_merging_pages[SLOT_MM(c, s)]--;
        n->rmap_hlist_len--;
        rmap_item_clear_flags(c, s);
        c->ri_head[s] = NIL;
    }
    n->hlist = NIL;
    trace_event(c, KSM_TRACE_REMOVE_KSM_PAGE, NIL, n->kpfn, NIL, 0);
    if (n->head == KSM_HEAD_MIGRATE)
        migrate_list_del(c, node);
    else
        stable_node_dup_del(c, node);
    free_stable_node(c, node);
}

/* ksm_get_folio(): the node is valid while its frame still names it (put_frame()
 * marks the node stale when it frees the frame); a stale node is removed on the
 * spot.  Returns the kpfn, or NIL. */
static int64_t ksm_get_folio(struct ksm_ctx *c, int32_t node)
{
    if (!c->stable[node].stale)
        return c->stable[node].kpfn;
    remove_node_from_stable_tree(c, node);
    return NIL;
}

/* ---------------------------------------------------------------- rmap_items */

/* rb_erase() of a deferred node: noted with the number of nodes inserted before it */
static void unstable_tree_erase_deferred(struct ksm_ctx *c, int32_t tn)
{
    if (c->nr_ulog + 2 > c->ulog_cap) {
        int64_t cap = c->ulog_cap ? 2 * c->ulog_cap : 1024;
        int32_t *log = realloc(c->ulog, (size_t)cap * sizeof(*log));
        if (!log) {
            unstable_tree_build(c); /* no room to defer: the tree now, then the erase */
            ksm_rb_erase(c->unode, tn, &c->root_unstable_tree[c->unid[tn]]);
            return;
        }
        c->ulog = log;
        c->ulog_cap = cap;
    }
    c->ulog[c->nr_ulog++] = tn;
    c->ulog[c->nr_ulog++] = c->ucount;
}

static void remove_rmap_item_from_tree(struct ksm_ctx *c, int64_t s)
{
    uint16_t f = c->ri_flags[s];
    if (f & KSM_STABLE_FLAG) {
        int32_t node = c->ri_head[s];
        if (ksm_get_folio(c, node) == NIL)
            return; /* the stale node went, and took this item's flags with it */
        /* hlist_del(): the hlist is singly linked here (4 bytes a page less); it is
         * at most max_page_sharing long but for a KSM fork's bypass */
        if (c->stable[node].hlist == s) {
            c->stable[node].hlist = c->ri_hnext[s];
        } else {
            int32_t pv = c->stable[node].hlist;
            while (c->ri_hnext[pv] != s)
                pv = c->ri_hnext[pv];
            c->ri_hnext[pv] = c->ri_hnext[s];
        }
        if (c->stable[node].hlist != NIL)
            c->pages_sharing--;
        else
            c->pages_shared--;
        c->mm_merging_pages[SLOT_MM(c, s)]--;
        c->stable[node].rmap_hlist_len--;
        c->ri_head[s] = NIL;
        rmap_item_clear_flags(c, s);
    } else if (f & KSM_UNSTABLE_FLAG) {
        /* erase only if inserted by this scan: older trees were reset already */
        uint8_t age = (uint8_t)(c->seqnr - (f & KSM_SEQNR_MASK));
        if (!age && c->ulazy)
            unstable_tree_erase_deferred(c, c->ri_head[s]);
        else if (!age)
            ksm_rb_erase(c->unode, c->ri_head[s], &c->root_unstable_tree[c->unid[c->ri_head[s]]]);
        c->pages_unshared--;
        rmap_item_clear_flags(c, s);
    }
}

static void free_rmap_item(struct ksm_ctx *c, int64_t s)
{
    c->ri_flags[s] &= KSM_SLOT_VM_MERGEABLE;
    c->rmap_items--;
    c->mm_rmap_items[SLOT_MM(c, s)]--;
}

void remove_trailing_rmap_items(struct ksm_ctx *c, int64_t lo, int64_t hi)
{
    unstable_tree_disturbed(c);
    /* remove_trailing_rmap_items() and get_next_rmap_item()'s removal of items
     * whose page is gone: both in address order */
    for (int64_t s = lo; s < hi; s++) {
        if (c->ri_flags[s] & KSM_ITEM_EXISTS) {
            remove_rmap_item_from_tree(c, s);
            free_rmap_item(c, s);
        }
    }
}

static void stable_tree_append(struct ksm_ctx *c, int64_t s, int32_t node)
{
    struct ksm_stable_node *n = &c->stable[node];
    int had_items = n->hlist != NIL;
    n->rmap_hlist_len++;
    c->ri_head[s] = node;
    c->ri_flags[s] |= KSM_STABLE_FLAG;
    /* hlist_add_head() */
    c->ri_hnext[s] = n->hlist;
    n->hlist = (int32_t)s;
    if (had_items)
        c->pages_sharing++;
    else
        c->pages_shared++;
    c->mm_merging_pages[SLOT_MM(c, s)]++;
}

/* ---------------------------------------------------------------- merging */

static void replace_page(struct ksm_ctx *c, int64_t s, int32_t page, int32_t kpage)
{
    if (kpage == 0) {
        /* the zero page: a special dirty PTE, counted in ksm_zero_pages */
        c->pte[s] = KSM_PTE_ZERO;
        c->ksm_zero_pages++;
        c->mm_zero_pages[SLOT_MM(c, s)]++;
    } else {
        c->pte[s] = kpage;
        c->frame_mapcount[kpage]++;
    }
    put_frame(c, page);
}

/* kpage NIL: make page itself a KSM page (with no stable node yet).
 * compared: the caller's tree walk has just found page and kpage equal, and nothing can
 * run in between in the model, so the kernel's pages_identical() would find them equal. */
static int try_to_merge_one_page(struct ksm_ctx *c, int64_t s, int32_t page, int32_t kpage,
                                 int compared, int pinned_twice)
{
    if (page == kpage) /* a forked KSM page: nothing to do */
        return 0;
    if (frame_folio(c, page) >= 0) {
        /* split_huge_page() fails while ksmd holds two references to the folio
         * (the scanned page and the tree page are subpages of one THP) */
        if (pinned_twice)
            return -1;
        split_huge_page(c, frame_folio(c, page));
    }
    /* write_protect_page(): the page must still be mapped here (a zero-filled
     * subpage became the shared zero page in the split) */
    if (c->pte[s] != page)
        return -1;
    /* write_protect_page() fails on a KSM folio: page_address_in_vma() finds no
     * anon_vma for it ("KSM folios don't reach here because of the !anon_vma
     * check"). Otherwise it cannot fail in the model: no GUP pins, no swap. */
    if (frame_is_ksm(c, page))
        return -1;
    if (kpage == NIL) {
        c->frame_stable[page] = KSM_FRAME_KSM_NULL;
        return 0;
    }
    if (!compared && memcmp_pages(page_address(c, page), page_address(c, kpage)) != 0)
        return -1;
    replace_page(c, s, page, kpage);
    return 0;
}

static inline int find_mergeable_vma(const struct ksm_ctx *c, int64_t s)
{
    return c->ri_flags[s] & KSM_SLOT_VM_MERGEABLE;
}

static int try_to_merge_with_ksm_page(struct ksm_ctx *c, int64_t s, int32_t page, int32_t kpage,
                                      int pinned_twice)
{
    int err = -1;
    if (find_mergeable_vma(c, s)) {
        err = try_to_merge_one_page(c, s, page, kpage, 1, pinned_twice);
        if (!err) /* the unstable nid shares storage with the stable anon_vma */
            remove_rmap_item_from_tree(c, s);
    }
    trace_event(c, KSM_TRACE_MERGE_WITH_KSM_PAGE, kpage, kpage != NIL ? kpage : page, s,
                err ? -14 : 0); /* -EFAULT */
    return err;
}

static int try_to_merge_with_zero_page(struct ksm_ctx *c, int64_t s, int32_t page)
{
    if (c->use_zero_pages && c->ri_oldchecksum[s] == c->zero_checksum) {
        if (!find_mergeable_vma(c, s))
            return 0;
        int err = try_to_merge_one_page(c, s, page, 0, 0, 0);
        trace_event(c, KSM_TRACE_MERGE_ONE_PAGE, NIL, 0, s, err ? -14 : 0);
        return err;
    }
    return -1;
}

static int32_t try_to_merge_two_pages(struct ksm_ctx *c, int64_t s, int32_t page,
                                      int64_t t, int32_t tree_page)
{
    /* the scanned page becomes the KSM page; the tree item's PTE moves onto it */
    int same = frame_folio(c, page) >= 0 && frame_folio(c, page) == frame_folio(c, tree_page);
    int err = try_to_merge_with_ksm_page(c, s, page, NIL, same);
    if (!err) {
        err = try_to_merge_with_ksm_page(c, t, tree_page, page, 0);
        /* a KSM tree page cannot be write-protected: then the scanned page, now a
         * KSM page with one mapping, is unshared (break_cow) - by Python, which
         * knows where the owner's policy allocates; ksm_scan_range stops here */
        if (err)
            c->pending_break_cow = s;
    }
    return err ? NIL : page;
}

/* stable_node_dup(): pick a dup of the chain *node: the first that can take another
 * mapping, or with prune (at most every stable_node_chains_prune_millisecs) the
 * fullest one after a walk that frees stale dups; a chain left with one dup collapses
 * into it (*node changes), one left with none is freed. Returns the dup's folio. */
static int64_t stable_node_dup(struct ksm_ctx *c, int32_t *dup_out, int32_t *node,
                               int32_t *root, int prune)
{
    int32_t chain = *node;
    struct ksm_stable_node *ch = &c->stable[chain];
    if (!prune || c->jiffies < ch->chain_prune_time + c->stable_node_chains_prune_millisecs)
        prune = 0;
    else
        ch->chain_prune_time = c->jiffies;

    int32_t found = NIL, found_len = 0;
    int64_t tree_folio = NIL;
    for (int32_t dup = ch->hlist, next; dup != NIL; dup = next) {
        next = c->stable[dup].next;
        int64_t f = ksm_get_folio(c, dup);
        if (f == NIL)
            continue;
        if (found == NIL ||
            (is_page_sharing_candidate(c, dup) &&
             (!is_page_sharing_candidate(c, found) || c->stable[dup].rmap_hlist_len > found_len))) {
            found = dup;
            found_len = c->stable[dup].rmap_hlist_len;
            tree_folio = f;
            if (!prune && is_page_sharing_candidate(c, found))
                break;
        }
    }

    ch = &c->stable[chain];
    if (found != NIL) {
        if (ch->hlist == found && c->stable[found].next == NIL) {
            /* one dup left: it replaces the chain in the tree */
            chain_hlist_del(c, found);
            stable_rb_replace(c, chain, found, root);
            c->stable[found].head = KSM_HEAD_TREE;
            c->stable[found].chain = NIL;
            free_stable_node(c, chain);
            c->stable_node_chains--;
            chain_list_del(c, chain);
            c->stable_node_dups--;
            *node = found;
        } else if (ch->hlist != found && __is_page_sharing_candidate(c, found, 1)) {
            /* keep the best dup first for the next non-pruning lookup */
            chain_hlist_del(c, found);
            struct ksm_stable_node *d = &c->stable[found];
            d->prev = NIL;
            d->next = ch->hlist;
            if (d->next != NIL)
                c->stable[d->next].prev = found;
            ch->hlist = found;
        }
    } else {
        free_stable_node_chain(c, chain, root);
    }
    *dup_out = found;
    return tree_folio;
}

/* __stable_node_chain(): a plain stable node is its own dup; a chain picks one */
static inline int64_t __stable_node_chain(struct ksm_ctx *c, int32_t *dup_out, int32_t *node,
                                          int32_t *root, int prune)
{
    if (!is_stable_node_chain(c, *node)) {
        *dup_out = *node;
        return ksm_get_folio(c, *node);
    }
    return stable_node_dup(c, dup_out, node, root, prune);
}

/* chain_prune(): stable_tree_search()'s lookup, which may prune and collapse */
static inline int64_t chain_prune(struct ksm_ctx *c, int32_t *dup_out, int32_t *node,
                                  int32_t *root)
{
    return __stable_node_chain(c, dup_out, node, root, 1);
}

/* chain(): stable_tree_insert()'s lookup, without pruning */
static inline int64_t chain(struct ksm_ctx *c, int32_t *dup_out, int32_t *node, int32_t *root)
{
    return __stable_node_chain(c, dup_out, node, root, 0);
}

/* memcmp_pages(page, the node's page), deciding on the cached prefix when it can */
static inline int cmp_stable_node(struct ksm_ctx *c, const uint8_t *page, uint64_t pfx,
                                  int32_t node, int64_t tree_folio)
{
    uint64_t np = c->stable[node].prefix;
    if (pfx != np)
        return pfx < np ? -1 : 1;
    return memcmp_pages(page, page_address(c, tree_folio));
}

/* Returns the frame to merge with, or NIL */
static int64_t __stable_tree_search(struct ksm_ctx *c, int32_t page, uint64_t pfx,
                                    int *chains);

/* stable_tree_search(), unless stable_walk_decided() says what it finds: nothing */
static int64_t stable_tree_search(struct ksm_ctx *c, int32_t page, uint64_t pfx)
{
    int chains = 0;
    if (c->frame_stable[page] < 0 && stable_walk_decided(c, pfx)) {
        c->nr_walks_decided++;
#ifdef KSM_CHECK_SHORTCUTS
        if (__stable_tree_search(c, page, pfx, &chains) != NIL || chains)
            abort(); /* stable_walk_decided() was wrong */
#endif
        return NIL;
    }
    return __stable_tree_search(c, page, pfx, &chains);
}

/* *chains: set when the walk passed a chain (stable_tree_search()'s check) */
static int64_t __stable_tree_search(struct ksm_ctx *c, int32_t page, uint64_t pfx,
                                    int *chains)
{
    int32_t page_node = c->frame_stable[page] >= 0 ? c->frame_stable[page] : NIL;
    if (page_node != NIL && c->stable[page_node].head != KSM_HEAD_MIGRATE)
        return page; /* a forked KSM page: its own page is the answer */

    int nid = get_kpfn_nid(c, page);
    int32_t *root = &c->root_stable_tree[nid];
    struct ksm_rbnode *rb = c->stable_rb;
    int32_t parent, *link, node = NIL, dup = NIL;
    const uint8_t *addr = page_address(c, page);

again:
    parent = NIL;
    link = root;
    while (*link != NIL) {
        node = *link;
        /* both children's nodes start loading while this level decides: the
         * deep levels of a large tree miss the cache at every step */
        for (int k = 0; k < 2; k++) {
            int32_t child = k ? rb[node].right : rb[node].left;
            if (child != NIL) {
                __builtin_prefetch(&c->stable[child]);
                __builtin_prefetch(&rb[child]);
            }
        }
        *chains |= is_stable_node_chain(c, node);
        int64_t tree_folio = chain_prune(c, &dup, &node, root);
        if (tree_folio == NIL)
            goto again; /* a stale node went and the tree may have rebalanced */
        int ret = cmp_stable_node(c, addr, pfx, node, tree_folio);
        parent = *link;
        if (ret < 0) {
            link = &rb[parent].left;
        } else if (ret > 0) {
            link = &rb[parent].right;
        } else {
            if (page_node != NIL && c->frame_mapcount[page] > 1)
                goto chain_append;
            if (!is_page_sharing_candidate(c, dup))
                return NIL; /* all dups full: let the unstable tree make a new one */
            if (ksm_get_folio(c, dup) == NIL)
                goto again;
            if (get_kpfn_nid(c, c->stable[dup].kpfn) != c->stable[dup].nid)
                goto replace;
            return c->stable[dup].kpfn;
        }
    }

    if (page_node == NIL)
        return NIL;
    /* a migrated KSM page with no equal content here: place it in this tree */
    migrate_list_del(c, page_node);
    c->stable[page_node].nid = nid;
    c->stable[page_node].migrated = 0;
    c->stable[page_node].head = KSM_HEAD_TREE;
    stable_rb_insert(c, page_node, parent, link, root);
out:
    return is_page_sharing_candidate(c, page_node) ? page : NIL;

replace: {
    /* the matching dup's page migrated to another node: page_node (if any)
     * takes its place, and the dup goes to migrate_nodes to be re-placed */
    int64_t result;
    if (dup == node) {
        if (page_node != NIL) {
            migrate_list_del(c, page_node);
            c->stable[page_node].nid = nid;
            c->stable[page_node].migrated = 0;
            c->stable[page_node].head = KSM_HEAD_TREE;
            stable_rb_replace(c, dup, page_node, root);
            result = is_page_sharing_candidate(c, page_node) ? page : NIL;
        } else {
            stable_rb_erase(c, dup, root);
            result = NIL;
        }
    } else {
        __stable_node_dup_del(c, dup);
        if (page_node != NIL) {
            migrate_list_del(c, page_node);
            c->stable[page_node].nid = nid;
            c->stable[page_node].migrated = 0;
            stable_node_chain_add_dup(c, page_node, node);
            result = is_page_sharing_candidate(c, page_node) ? page : NIL;
        } else {
            result = NIL;
        }
    }
    migrate_list_add(c, dup);
    return result;
}

chain_append:
    /* a migrated KSM page meets equal content: it becomes another dup */
    if (dup == node)
        node = alloc_stable_node_chain(c, dup, root);
    migrate_list_del(c, page_node);
    c->stable[page_node].nid = nid;
    c->stable[page_node].migrated = 0;
    stable_node_chain_add_dup(c, page_node, node);
    goto out;
}

static int32_t stable_tree_insert(struct ksm_ctx *c, int32_t kpfn)
{
    int nid = get_kpfn_nid(c, kpfn);
    int32_t *root = &c->root_stable_tree[nid];
    struct ksm_rbnode *rb = c->stable_rb;
    int32_t parent, *link, node = NIL, dup;
    int need_chain = 0;
    const uint8_t *addr = page_address(c, kpfn);
    uint64_t pfx = page_prefix(addr);

again:
    parent = NIL;
    link = root;
    while (*link != NIL) {
        node = *link;
        int64_t tree_folio = chain(c, &dup, &node, root);
        if (tree_folio == NIL)
            goto again;
        int ret = cmp_stable_node(c, addr, pfx, node, tree_folio);
        parent = *link;
        if (ret < 0) {
            link = &rb[parent].left;
        } else if (ret > 0) {
            link = &rb[parent].right;
        } else {
            need_chain = 1;
            break;
        }
    }

    int32_t new_dup = alloc_stable_node(c);
    c->stable[new_dup].kpfn = kpfn;
    c->stable[new_dup].prefix = pfx;
    c->stable[new_dup].nid = nid;
    if (!need_chain) {
        stable_rb_insert(c, new_dup, parent, link, root);
    } else {
        /* node is what the walk met (a chain, or a node a collapse left there) */
        if (!is_stable_node_chain(c, node))
            node = alloc_stable_node_chain(c, node, root);
        stable_node_chain_add_dup(c, new_dup, node);
    }
    c->frame_stable[kpfn] = new_dup;
    return new_dup;
}

/* unstable_tree_search_insert()'s bookkeeping of a new node tn for slot s */
static void unstable_node_init(struct ksm_ctx *c, int32_t tn, int64_t s, int nid, uint64_t pfx)
{
    c->uslot[tn] = (int32_t)s;
    c->unid[tn] = (int16_t)nid;
    c->uprefix[tn] = pfx;
    c->ri_head[s] = tn; /* for an unstable item, its tree node */
    c->ri_flags[s] = (c->ri_flags[s] & (KSM_SLOT_VM_MERGEABLE | KSM_SLOT_CSUM_FRESH)) |
                     KSM_ITEM_EXISTS | KSM_UNSTABLE_FLAG |
                     (uint16_t)(c->seqnr & KSM_SEQNR_MASK);
    c->pages_unshared++;
}

/* Link a deferred node where the walk that inserted it would have: the pages are as
 * they were then, so the comparisons are too (prefixes first, as memcmp orders). */
static void unstable_tree_link(struct ksm_ctx *c, int32_t tn)
{
    struct ksm_rbnode *un = c->unode;
    int32_t *root = &c->root_unstable_tree[c->unid[tn]];
    int32_t parent = NIL, *link = root;
    const uint8_t *addr = page_address(c, c->pte[c->uslot[tn]]);
    uint64_t pfx = c->uprefix[tn];
    while (*link != NIL) {
        int32_t x = *link;
        int ret;
        if (c->uprefix[x] != pfx)
            ret = pfx < c->uprefix[x] ? -1 : 1;
        else
            ret = memcmp_pages(addr, page_address(c, c->pte[c->uslot[x]]));
        parent = x;
        link = ret < 0 ? &un[parent].left : &un[parent].right;
    }
    ksm_rb_link_node(un, tn, parent, link);
    ksm_rb_insert_color(un, tn, root);
}

/* the deferred inserts (in tn order) and erases of this round, in the order they
 * were made, into the rbtree */
static void unstable_tree_build(struct ksm_ctx *c)
{
    int64_t e = 0;
    c->ulazy = 0;
    for (int32_t tn = 0; tn <= c->ucount; tn++) {
        for (; e < c->nr_ulog && c->ulog[e + 1] <= tn; e += 2) {
            int32_t gone = c->ulog[e];
            ksm_rb_erase(c->unode, gone, &c->root_unstable_tree[c->unid[gone]]);
        }
        if (tn < c->ucount)
            unstable_tree_link(c, tn);
    }
    c->nr_ulog = 0;
}

/* unstable_tree_search_insert() on a deferred tree: a node of equal content is what
 * the walk would find (and the checks it makes there), else the page goes in. */
static int32_t unstable_tree_search_insert_deferred(struct ksm_ctx *c, int64_t s, int32_t page,
                                                    int nid, uint64_t pfx, int32_t *tree_page)
{
    uint32_t checksum = c->ri_oldchecksum[s];
    const uint8_t *addr = page_address(c, page);
    int64_t h = uhash_index(c, checksum, nid);
    uint8_t tag = uhash_tag(checksum);
    for (; c->uhash[h]; h = (h + 1) & c->uhash_mask) {
        if (c->utag[h] != tag)
            continue; /* another checksum */
        int32_t tn = (int32_t)c->uhash[h] - 1;
        int32_t t = c->uslot[tn];
        if (c->unid[tn] != nid || c->ri_oldchecksum[t] != checksum || !unstable_node_live(c, tn))
            continue;
        int32_t tp = c->pte[t];
        if (tp == page) /* COW-shared with the scanned page since fork */
            return NIL;
        if (memcmp_pages(addr, page_address(c, tp)) != 0)
            continue; /* equal checksums, other contents */
        if (!c->merge_across_nodes && frame_nid(c, tp) != nid)
            return NIL;
        *tree_page = tp;
        return t;
    }
    int32_t tn = c->ucount++; /* capacity guaranteed by ksm_reserve() */
    unstable_node_init(c, tn, s, nid, pfx);
    uhash_set(c, h, tn);
    return NIL;
}

static int32_t unstable_tree_search_insert(struct ksm_ctx *c, int64_t s, int32_t page,
                                           uint64_t pfx, int32_t *tree_page)
{
    int nid = get_kpfn_nid(c, page);
    if (c->ulazy) {
        /* the page is the one mapped, and its checksum is of it: else build the tree */
        if (c->pte[s] == page && (c->ri_flags[s] & KSM_SLOT_CSUM_FRESH))
            return unstable_tree_search_insert_deferred(c, s, page, nid, pfx, tree_page);
        unstable_tree_build(c);
    }
    int32_t *root = &c->root_unstable_tree[nid];
    struct ksm_rbnode *un = c->unode;
    int32_t parent = NIL, *link = root;
    const uint8_t *addr = page_address(c, page);

    while (*link != NIL) {
        int32_t tn = *link;
        /* as in stable_tree_search(): the next level starts loading now */
        for (int k = 0; k < 2; k++) {
            int32_t child = k ? un[tn].right : un[tn].left;
            if (child != NIL) {
                __builtin_prefetch(&un[child]);
                __builtin_prefetch(&c->uslot[child]);
                __builtin_prefetch(&c->uprefix[child]);
            }
        }
        uint64_t tpfx = c->uprefix[tn];
        if (tn >= c->uquiet_from && tpfx != pfx) {
            /* nothing outside the scan touched the tree page since its insertion:
             * get_mergeable_page() finds it as it was, and the prefixes decide */
            parent = tn;
            link = pfx < tpfx ? &un[parent].left : &un[parent].right;
            continue;
        }
        int32_t t = c->uslot[tn];
        /* get_mergeable_page(): still in a mergeable VMA, still present, not zero */
        int32_t tp = c->pte[t];
        if (!(c->ri_flags[t] & KSM_SLOT_VM_MERGEABLE) || tp < 0)
            return NIL;
        if (tp == page) /* COW-shared with the scanned page since fork */
            return NIL;
        /* The unstable tree's pages may change under it, so the kernel compares the
         * contents as they are now. A tree page not written since its insertion
         * (its checksum still fresh) still has the prefix it had then: when that
         * differs, it orders the two pages as memcmp would, without reading the
         * tree page (a cache miss at every level of a large tree). */
        int ret;
        if ((c->ri_flags[t] & KSM_SLOT_CSUM_FRESH) && tpfx != pfx)
            ret = pfx < tpfx ? -1 : 1;
        else
            ret = memcmp_pages(addr, page_address(c, tp));
        parent = tn;
        if (ret < 0) {
            link = &un[parent].left;
        } else if (ret > 0) {
            link = &un[parent].right;
        } else if (!c->merge_across_nodes && frame_nid(c, tp) != nid) {
            /* equal, but the tree page moved to another node: good for the
             * ordering, never a merge leaf (Hugh Dickins, 2013) */
            return NIL;
        } else {
            *tree_page = tp;
            return t;
        }
    }

    int32_t tn = c->ucount++; /* capacity guaranteed by ksm_reserve() */
    unstable_node_init(c, tn, s, nid, pfx);
    ksm_rb_link_node(un, tn, parent, link);
    ksm_rb_insert_color(un, tn, root);
    return NIL;
}

/* The checksum test of cmp_and_merge_page(): 1 when there is nothing more to do,
 * because the page changed since its last visit (volatile) or was merged with the
 * zero page. */
static int volatile_or_zero(struct ksm_ctx *c, int64_t s, int32_t page)
{
    uint32_t checksum;
    if (c->ri_flags[s] & KSM_SLOT_CSUM_FRESH) {
        /* nothing wrote this page since its checksum was taken: a cache, the value
         * is the one calc_checksum() would return */
        checksum = c->ri_oldchecksum[s];
#ifdef KSM_CHECK_SHORTCUTS
        if (checksum != calc_checksum(page_address(c, page)))
            abort(); /* a write did not clear KSM_SLOT_CSUM_FRESH */
#endif
    } else {
        checksum = calc_checksum(page_address(c, page));
        c->ri_flags[s] |= KSM_SLOT_CSUM_FRESH;
    }
    if (c->ri_oldchecksum[s] != checksum) {
        c->ri_oldchecksum[s] = checksum;
        return 1;
    }
    return !try_to_merge_with_zero_page(c, s, page);
}

/* The prefix of the page at slot s as its node in the last round's unstable tree
 * recorded it, when that node is still the slot's (no later insert took its index)
 * and the page was not written since (its checksum still fresh): the value
 * page_prefix() would read, without reading the page (a cache miss for each page of
 * a round that repeats the last). */
static inline int prefix_recorded(const struct ksm_ctx *c, int64_t s, uint64_t *pfx)
{
    const uint16_t both = KSM_UNSTABLE_FLAG | KSM_SLOT_CSUM_FRESH;
    if (!c->scan_shortcuts || (c->ri_flags[s] & both) != both)
        return 0;
    int32_t tn = c->ri_head[s];
    if (tn < 0 || tn >= c->ucap || c->uslot[tn] != s)
        return 0;
    *pfx = c->uprefix[tn];
    return 1;
}

static void cmp_and_merge_page(struct ksm_ctx *c, int64_t s)
{
    int32_t page = c->pte[s];
    int32_t stable_node = c->frame_stable[page] >= 0 ? c->frame_stable[page] : NIL;
    uint64_t pfx = 0;
    int pfx_known = prefix_recorded(c, s, &pfx); /* before the item leaves the tree */

    if (stable_node != NIL) {
        struct ksm_stable_node *sn = &c->stable[stable_node];
        if (sn->head != KSM_HEAD_MIGRATE && get_kpfn_nid(c, sn->kpfn) != sn->nid) {
            stable_node_dup_del(c, stable_node);
            migrate_list_add(c, stable_node);
        }
        if (c->stable[stable_node].head != KSM_HEAD_MIGRATE &&
            (c->ri_flags[s] & KSM_STABLE_FLAG) && c->ri_head[s] == stable_node)
            return; /* already accounted */
        /* the kernel notes here whether a KSM fork took the chain past
         * max_page_sharing (max_page_sharing_bypass); it only feeds a WARN */
    } else if (c->checksum_first) {
        /* 6.11+: a page that is not a KSM page meets the checksum first */
        remove_rmap_item_from_tree(c, s);
        if (volatile_or_zero(c, s, page))
            return;
    }

    if (!pfx_known)
        pfx = page_prefix(page_address(c, page));
    else
        c->nr_prefix_recorded++;
#ifdef KSM_CHECK_SHORTCUTS
    if (pfx_known && pfx != page_prefix(page_address(c, page)))
        abort(); /* prefix_recorded() was wrong: it must decide nothing differently */
#endif
    int64_t kfolio = stable_tree_search(c, page, pfx);
    if (kfolio == page && stable_node != NIL && (c->ri_flags[s] & KSM_STABLE_FLAG) &&
        c->ri_head[s] == stable_node)
        return;

    remove_rmap_item_from_tree(c, s);

    if (kfolio != NIL) {
        if (!try_to_merge_with_ksm_page(c, s, page, (int32_t)kfolio, 0))
            stable_tree_append(c, s, c->frame_stable[kfolio]);
        return;
    }
    /* before 6.11 every page searched the stable tree first, then the checksum */
    if (!c->checksum_first && volatile_or_zero(c, s, page))
        return;

    int32_t tree_page = NIL;
    int32_t t = unstable_tree_search_insert(c, s, page, pfx, &tree_page);
    if (t == NIL && c->pte[s] != page)
        unstable_tree_disturbed(c); /* inserted with its page gone (split to zero) */
    if (t != NIL) {
        /* both subpages of one THP: the merge failed, split it now (no merge) */
        int split = frame_folio(c, page) >= 0 && frame_folio(c, page) == frame_folio(c, tree_page);
        int32_t kpfn = try_to_merge_two_pages(c, s, page, t, tree_page);
        if (kpfn != NIL) {
            int32_t node = stable_tree_insert(c, kpfn);
            stable_tree_append(c, t, node);
            stable_tree_append(c, s, node);
        } else if (split && frame_folio(c, page) >= 0) {
            split_huge_page(c, frame_folio(c, page));
        }
    }
}

/* should_skip_rmap_item(): smart scan skips pages that keep failing to merge */
static int should_skip_rmap_item(struct ksm_ctx *c, int64_t s, int32_t page)
{
    if (!c->smart_scan)
        return 0;
    if (frame_is_ksm(c, page))
        return 0;
    uint8_t age = c->ri_age[s];
    if (age != 255)
        c->ri_age[s]++;
    if (age < 3)
        return 0;
    if (!c->ri_remaining_skips[s]) {
        c->ri_remaining_skips[s] = age <= 3 ? 1 : age <= 5 ? 2 : age <= 8 ? 4 : 8;
        return 0;
    }
    c->pages_skipped++;
    c->ri_remaining_skips[s]--;
    remove_rmap_item_from_tree(c, s);
    return 1;
}

/* A slot's page when it will be compared rather than hashed (its checksum is cached;
 * a KSM page is passed over as already accounted; a page whose prefix is recorded is
 * read only if that prefix meets an equal one), else NULL: ksm_scan_range() starts
 * reading it ahead. Equal pages are compared whole, and the hardware prefetcher
 * stops at every 4 KiB page; a page about to be hashed is streamed fast enough by
 * the hash. (The prefetch loop stays in the caller: GCC drops a call to a function
 * that only prefetches, as having no effect.) */
static inline const uint8_t *page_to_prefetch(const struct ksm_ctx *c, int64_t s)
{
    int32_t page = c->pte[s];
    uint64_t pfx;
    if (page < 0 || !(c->ri_flags[s] & KSM_SLOT_CSUM_FRESH) || frame_is_ksm(c, page) ||
        prefix_recorded(c, s, &pfx))
        return NULL;
    return page_address(c, page);
}

/* The end of a full batch of ksm_do_scan(batch_pages): its row in the log, then the
 * clock at its end and, unless it is the call's @last, after the next batch's
 * overhead (what Python's do_scan() charges around each batch). */
static void ksm_batch_end(struct ksm_ctx *c, int last)
{
    if (c->nr_batch_log < c->batch_log_cap) {
        int64_t *row = c->batch_log + c->nr_batch_log * KSM_BATCH_LOG_COLS;
        row[0] = c->batch_done;
        row[1] = c->pages_sharing;
        row[2] = c->ksm_zero_pages;
        row[3] = c->rmap_items;
        c->nr_batch_log++;
    }
    c->batch_clock_ns += c->batch_done * c->page_ns;
    if (!last)
        c->batch_clock_ns += c->batch_ns;
    c->batch_done = 0;
    c->jiffies = (uint64_t)c->batch_clock_ns / 1000000u; /* HZ=1000 */
}

/* how many pages ahead ksm_scan_range() starts reading a page's first line: far
 * enough for its page walk and cache miss to finish while the pages between are
 * merged (each page is read from a new page of memory, which the hardware
 * prefetcher does not cross into) */
#define PREFETCH_AHEAD 8

int64_t ksm_scan_range(struct ksm_ctx *c, int64_t lo, int64_t hi, int64_t budget, int64_t *next)
{
    int64_t processed = 0;
    int merging = 1; /* the last page processed merged */
    for (int64_t s = lo; s < hi; s++) {
        int32_t page = c->pte[s];
        uint16_t f = c->ri_flags[s];
        if (page < 0) {
            /* no page here (or the KSM zero page): the scan does not see it, and
             * get_next_rmap_item() frees an item left from an earlier page */
            if (f & KSM_ITEM_EXISTS) {
                remove_rmap_item_from_tree(c, s);
                free_rmap_item(c, s);
            }
            continue;
        }
        if (!(f & KSM_ITEM_EXISTS)) {
            /* alloc_rmap_item(): zeroed, so the first visit only records a checksum */
            c->ri_flags[s] = (f & KSM_SLOT_VM_MERGEABLE) | KSM_ITEM_EXISTS;
            c->ri_oldchecksum[s] = 0;
            c->ri_age[s] = 0;
            c->ri_remaining_skips[s] = 0;
            c->ri_head[s] = NIL;
            c->rmap_items++;
            c->mm_rmap_items[SLOT_MM(c, s)]++;
        }
        if (should_skip_rmap_item(c, s, page))
            continue;
        if (s + PREFETCH_AHEAD < hi) {
            int64_t f = s + PREFETCH_AHEAD;
            const uint8_t *far = page_to_prefetch(c, f);
            if (far)
                __builtin_prefetch(far, 0, 1); /* its prefix, read by both tree walks */
            if (c->ulazy && c->pte[f] >= 0 && (c->ri_flags[f] & KSM_SLOT_CSUM_FRESH) &&
                !frame_is_ksm(c, c->pte[f])) {
                /* where that page's search of the deferred tree looks first (its
                 * checksum is cached): a large table misses the caches on every page */
                int64_t h = uhash_index(c, c->ri_oldchecksum[f], get_kpfn_nid(c, c->pte[f]));
                __builtin_prefetch(&c->uhash[h]);
                __builtin_prefetch(&c->utag[h]);
            }
        }
        const uint8_t *ahead = s + 1 < hi ? page_to_prefetch(c, s + 1) : NULL;
        if (ahead) {
            /* the whole page when the last one merged (runs of equal pages are
             * compared whole), else its first lines: the prefixes decide most walks */
            size_t lines = merging ? KSM_PAGE_SIZE : 128;
            for (size_t off = 0; off < lines; off += 64)
                __builtin_prefetch(ahead + off, 0, 1); /* low locality: read once, soon */
        }
        int64_t merged = c->pages_sharing + c->ksm_zero_pages;
        cmp_and_merge_page(c, s);
        merging = c->pages_sharing + c->ksm_zero_pages != merged;
        c->pages_scanned++;
        ++processed;
        if (c->batch_pages && ++c->batch_done == c->batch_pages)
            ksm_batch_end(c, processed == budget);
        if (processed == budget || c->pending_break_cow != NIL) {
            *next = s + 1;
            return processed;
        }
    }
    *next = hi;
    return processed;
}

void ksm_start_round(struct ksm_ctx *c)
{
    if (!c->merge_across_nodes) {
        /* stale nodes on migrate_nodes would pile up: prune them each round */
        for (int32_t i = c->migrate_nodes, next; i != NIL; i = next) {
            next = c->stable[i].next;
            ksm_get_folio(c, i);
        }
    }
    /* Every root, not only the ksm_nr_node_ids in use: the kernel leaves the others
     * alone, and after merge_across_nodes goes 0 -> 1 -> 0 within a round it would walk
     * a stale tree of freed rmap_items. Resetting all of them is that walk made safe. */
    for (int nid = 0; nid < KSM_MAX_NUMNODES; nid++)
        c->root_unstable_tree[nid] = NIL;
    c->ucount = 0; /* the unstable tree's nodes are all dropped with it */
    c->uquiet_from = 0;
    c->nr_ulog = 0;
    c->ulazy = c->unstable_lazy;
    uhash_clear(c);
    if (!c->spfx_ok)
        spfx_rebuild(c);
}

/* remove_stable_node(): 0 when gone, -1 (EBUSY) when its page is still mapped */
static int remove_stable_node(struct ksm_ctx *c, int32_t node)
{
    if (ksm_get_folio(c, node) == NIL)
        return 0;
    /* a KSM frame with mapcount 0 is freed at once in the model, so a valid
     * node's page is always mapped */
    return -1;
}

int ksm_remove_all_stable_nodes(struct ksm_ctx *c)
{
    unstable_tree_disturbed(c);
    int err = 0;
    for (int nid = 0; nid < c->ksm_nr_node_ids; nid++) {
        int32_t *root = &c->root_stable_tree[nid];
        while (*root != NIL) {
            int32_t node = *root, busy = 0;
            if (!is_stable_node_chain(c, node)) {
                busy = remove_stable_node(c, node);
            } else {
                for (int32_t dup = c->stable[node].hlist, next; dup != NIL; dup = next) {
                    next = c->stable[dup].next;
                    if (remove_stable_node(c, dup)) {
                        busy = 1;
                        break;
                    }
                }
                if (!busy)
                    free_stable_node_chain(c, node, root);
            }
            if (busy) {
                err = -1;
                break; /* on to the next nid */
            }
        }
    }
    for (int32_t i = c->migrate_nodes, next; i != NIL; i = next) {
        next = c->stable[i].next;
        if (remove_stable_node(c, i))
            err = -1;
    }
    return err;
}
