/*
 * rbtree.c - lib/rbtree.c's red-black tree over index-linked nodes.
 *
 * The rotations and recolourings follow lib/rbtree.c case by case (insert cases
 * 1-3, erase with the successor, erase-colour cases 1-4, replace), so that after
 * any sequence of operations the tree has the kernel's shape.  That matters: when
 * page contents change under the unstable tree, which pages a walk meets depends
 * on the shape.  KSM_NIL is the NULL pointer; *root holds the root index.
 */
#include "ksmcore.h"

#define RB_RED 0
#define RB_BLACK 1

/* The parent index and the colour share one word, as lib/rbtree.c's
 * __rb_parent_color does: (parent + 1) << 1 | colour, so KSM_NIL is 0. */
static inline int32_t rb_parent(const struct ksm_rbnode *n, int32_t i)
{
    return (n[i].parent_color >> 1) - 1;
}

static inline int32_t rb_color(const struct ksm_rbnode *n, int32_t i)
{
    return n[i].parent_color & 1;
}

static inline void set_parent_color(struct ksm_rbnode *n, int32_t i, int32_t parent, int32_t color)
{
    n[i].parent_color = (int32_t)((uint32_t)(parent + 1) << 1) | color;
}

static inline void rb_set_parent(struct ksm_rbnode *n, int32_t i, int32_t parent)
{
    set_parent_color(n, i, parent, rb_color(n, i));
}

static inline void rb_set_color(struct ksm_rbnode *n, int32_t i, int32_t color)
{
    n[i].parent_color = (n[i].parent_color & ~1) | color;
}

static inline int is_black(const struct ksm_rbnode *n, int32_t i)
{
    return i == KSM_NIL || rb_color(n, i) == RB_BLACK;
}

static inline int is_red(const struct ksm_rbnode *n, int32_t i)
{
    return i != KSM_NIL && rb_color(n, i) == RB_RED;
}

static inline void change_child(struct ksm_rbnode *n, int32_t old, int32_t new_node,
                                int32_t parent, int32_t *root)
{
    if (parent != KSM_NIL) {
        if (n[parent].left == old)
            n[parent].left = new_node;
        else
            n[parent].right = new_node;
    } else {
        *root = new_node;
    }
}

/* new takes old's place and colour; old becomes new's child with `color` */
static inline void rotate_set_parents(struct ksm_rbnode *n, int32_t old, int32_t new_node,
                                      int32_t *root, int32_t color)
{
    int32_t parent = rb_parent(n, old);
    n[new_node].parent_color = n[old].parent_color;
    set_parent_color(n, old, new_node, color);
    change_child(n, old, new_node, parent, root);
}

void ksm_rb_link_node(struct ksm_rbnode *n, int32_t node, int32_t parent, int32_t *link)
{
    set_parent_color(n, node, parent, RB_RED);
    n[node].left = n[node].right = KSM_NIL;
    *link = node;
}

void ksm_rb_insert_color(struct ksm_rbnode *n, int32_t node, int32_t *root)
{
    int32_t parent = rb_parent(n, node), gparent, tmp;

    for (;;) {
        if (parent == KSM_NIL) {
            set_parent_color(n, node, KSM_NIL, RB_BLACK);
            break;
        }
        if (rb_color(n, parent) == RB_BLACK)
            break;
        gparent = rb_parent(n, parent);
        tmp = n[gparent].right;
        if (parent != tmp) { /* parent == gparent->left */
            if (is_red(n, tmp)) {
                /* case 1: uncle red, flip colours and go up */
                set_parent_color(n, tmp, gparent, RB_BLACK);
                set_parent_color(n, parent, gparent, RB_BLACK);
                node = gparent;
                parent = rb_parent(n, node);
                set_parent_color(n, node, parent, RB_RED);
                continue;
            }
            tmp = n[parent].right;
            if (node == tmp) {
                /* case 2: left rotate at parent */
                tmp = n[node].left;
                n[parent].right = tmp;
                n[node].left = parent;
                if (tmp != KSM_NIL)
                    set_parent_color(n, tmp, parent, RB_BLACK);
                set_parent_color(n, parent, node, RB_RED);
                parent = node;
                tmp = n[node].right;
            }
            /* case 3: right rotate at gparent */
            n[gparent].left = tmp;
            n[parent].right = gparent;
            if (tmp != KSM_NIL)
                set_parent_color(n, tmp, gparent, RB_BLACK);
            rotate_set_parents(n, gparent, parent, root, RB_RED);
            break;
        } else {
            tmp = n[gparent].left;
            if (is_red(n, tmp)) {
                set_parent_color(n, tmp, gparent, RB_BLACK);
                set_parent_color(n, parent, gparent, RB_BLACK);
                node = gparent;
                parent = rb_parent(n, node);
                set_parent_color(n, node, parent, RB_RED);
                continue;
            }
            tmp = n[parent].left;
            if (node == tmp) {
                /* case 2: right rotate at parent */
                tmp = n[node].right;
                n[parent].left = tmp;
                n[node].right = parent;
                if (tmp != KSM_NIL)
                    set_parent_color(n, tmp, parent, RB_BLACK);
                set_parent_color(n, parent, node, RB_RED);
                parent = node;
                tmp = n[node].left;
            }
            /* case 3: left rotate at gparent */
            n[gparent].right = tmp;
            n[parent].left = gparent;
            if (tmp != KSM_NIL)
                set_parent_color(n, tmp, gparent, RB_BLACK);
            rotate_set_parents(n, gparent, parent, root, RB_RED);
            break;
        }
    }
}

static void erase_color(struct ksm_rbnode *n, int32_t parent, int32_t *root)
{
    int32_t node = KSM_NIL, sibling, tmp1, tmp2;

    for (;;) {
        sibling = n[parent].right;
        if (node != sibling) { /* node == parent->left */
            if (is_red(n, sibling)) {
                /* case 1: left rotate at parent */
                tmp1 = n[sibling].left;
                n[parent].right = tmp1;
                n[sibling].left = parent;
                set_parent_color(n, tmp1, parent, RB_BLACK);
                rotate_set_parents(n, parent, sibling, root, RB_RED);
                sibling = tmp1;
            }
            tmp1 = n[sibling].right;
            if (is_black(n, tmp1)) {
                tmp2 = n[sibling].left;
                if (is_black(n, tmp2)) {
                    /* case 2: sibling colour flip */
                    set_parent_color(n, sibling, parent, RB_RED);
                    if (rb_color(n, parent) == RB_RED) {
                        rb_set_color(n, parent, RB_BLACK);
                    } else {
                        node = parent;
                        parent = rb_parent(n, node);
                        if (parent != KSM_NIL)
                            continue;
                    }
                    break;
                }
                /* case 3: right rotate at sibling */
                tmp1 = n[tmp2].right;
                n[sibling].left = tmp1;
                n[tmp2].right = sibling;
                n[parent].right = tmp2;
                if (tmp1 != KSM_NIL)
                    set_parent_color(n, tmp1, sibling, RB_BLACK);
                tmp1 = sibling;
                sibling = tmp2;
            }
            /* case 4: left rotate at parent and colour flips */
            tmp2 = n[sibling].left;
            n[parent].right = tmp2;
            n[sibling].left = parent;
            set_parent_color(n, tmp1, sibling, RB_BLACK);
            if (tmp2 != KSM_NIL)
                rb_set_parent(n, tmp2, parent);
            rotate_set_parents(n, parent, sibling, root, RB_BLACK);
            break;
        } else {
            sibling = n[parent].left;
            if (is_red(n, sibling)) {
                /* case 1: right rotate at parent */
                tmp1 = n[sibling].right;
                n[parent].left = tmp1;
                n[sibling].right = parent;
                set_parent_color(n, tmp1, parent, RB_BLACK);
                rotate_set_parents(n, parent, sibling, root, RB_RED);
                sibling = tmp1;
            }
            tmp1 = n[sibling].left;
            if (is_black(n, tmp1)) {
                tmp2 = n[sibling].right;
                if (is_black(n, tmp2)) {
                    set_parent_color(n, sibling, parent, RB_RED);
                    if (rb_color(n, parent) == RB_RED) {
                        rb_set_color(n, parent, RB_BLACK);
                    } else {
                        node = parent;
                        parent = rb_parent(n, node);
                        if (parent != KSM_NIL)
                            continue;
                    }
                    break;
                }
                /* case 3: left rotate at sibling */
                tmp1 = n[tmp2].left;
                n[sibling].right = tmp1;
                n[tmp2].left = sibling;
                n[parent].left = tmp2;
                if (tmp1 != KSM_NIL)
                    set_parent_color(n, tmp1, sibling, RB_BLACK);
                tmp1 = sibling;
                sibling = tmp2;
            }
            /* case 4: right rotate at parent and colour flips */
            tmp2 = n[sibling].right;
            n[parent].left = tmp2;
            n[sibling].right = parent;
            set_parent_color(n, tmp1, sibling, RB_BLACK);
            if (tmp2 != KSM_NIL)
                rb_set_parent(n, tmp2, parent);
            rotate_set_parents(n, parent, sibling, root, RB_BLACK);
            break;
        }
    }
}

void ksm_rb_erase(struct ksm_rbnode *n, int32_t node, int32_t *root)
{
    int32_t child = n[node].right, tmp = n[node].left;
    int32_t parent, rebalance;

    if (tmp == KSM_NIL) {
        /* at most one child, the right one */
        parent = rb_parent(n, node);
        change_child(n, node, child, parent, root);
        if (child != KSM_NIL) {
            n[child].parent_color = n[node].parent_color;
            rebalance = KSM_NIL;
        } else {
            rebalance = rb_color(n, node) == RB_BLACK ? parent : KSM_NIL;
        }
    } else if (child == KSM_NIL) {
        /* only a left child */
        n[tmp].parent_color = n[node].parent_color;
        parent = rb_parent(n, node);
        change_child(n, node, tmp, parent, root);
        rebalance = KSM_NIL;
    } else {
        int32_t successor = child, child2;

        tmp = n[child].left;
        if (tmp == KSM_NIL) {
            /* the successor is node's right child */
            parent = successor;
            child2 = n[successor].right;
        } else {
            /* the successor is leftmost in the right subtree */
            do {
                parent = successor;
                successor = tmp;
                tmp = n[tmp].left;
            } while (tmp != KSM_NIL);
            child2 = n[successor].right;
            n[parent].left = child2;
            n[successor].right = child;
            rb_set_parent(n, child, successor);
        }

        tmp = n[node].left;
        n[successor].left = tmp;
        rb_set_parent(n, tmp, successor);

        change_child(n, node, successor, rb_parent(n, node), root);

        if (child2 != KSM_NIL) {
            set_parent_color(n, child2, parent, RB_BLACK);
            rebalance = KSM_NIL;
        } else {
            rebalance = rb_color(n, successor) == RB_BLACK ? parent : KSM_NIL;
        }
        n[successor].parent_color = n[node].parent_color;
    }
    if (rebalance != KSM_NIL)
        erase_color(n, rebalance, root);
}

void ksm_rb_replace_node(struct ksm_rbnode *n, int32_t victim, int32_t new_node, int32_t *root)
{
    int32_t parent = rb_parent(n, victim);

    n[new_node] = n[victim];
    if (n[victim].left != KSM_NIL)
        rb_set_parent(n, n[victim].left, new_node);
    if (n[victim].right != KSM_NIL)
        rb_set_parent(n, n[victim].right, new_node);
    change_child(n, victim, new_node, parent, root);
}

int32_t ksm_rb_first(const struct ksm_rbnode *n, int32_t root)
{
    if (root == KSM_NIL)
        return KSM_NIL;
    while (n[root].left != KSM_NIL)
        root = n[root].left;
    return root;
}

int32_t ksm_rb_next(const struct ksm_rbnode *n, int32_t node)
{
    int32_t parent;

    if (n[node].right != KSM_NIL) {
        node = n[node].right;
        while (n[node].left != KSM_NIL)
            node = n[node].left;
        return node;
    }
    while ((parent = rb_parent(n, node)) != KSM_NIL && node == n[parent].right)
        node = parent;
    return parent;
}
