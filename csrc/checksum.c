/*
 * checksum.c - calc_checksum() and memcmp_pages() as mm/ksm.c and mm/util.c have them.
 *
 * The kernel's checksum is xxhash(page, PAGE_SIZE, 0) truncated to 32 bits, where
 * xxhash() is XXH64 on 64-bit kernels.  XXH64 is written here from the public
 * specification (xxHash's doc/xxhash_spec.md): 32-byte stripes in four lanes,
 * then the tail, then the avalanche.  Words are read little-endian.
 */
#include <string.h>

#include "ksmcore.h"

#define P64_1 0x9E3779B185EBCA87ULL
#define P64_2 0xC2B2AE3D27D4EB4FULL
#define P64_3 0x165667B19E3779F9ULL
#define P64_4 0x85EBCA77C2B2AE63ULL
#define P64_5 0x27D4EB2F165667C5ULL

static inline uint64_t rotl64(uint64_t x, unsigned r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t read64(const uint8_t *p)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return v;
#else
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
#endif
}

static inline uint32_t read32(const uint8_t *p)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
#else
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
#endif
}

static inline uint64_t xxh64_round(uint64_t acc, uint64_t input)
{
    acc += input * P64_2;
    acc = rotl64(acc, 31);
    return acc * P64_1;
}

static inline uint64_t xxh64_merge_round(uint64_t acc, uint64_t val)
{
    acc ^= xxh64_round(0, val);
    return acc * P64_1 + P64_4;
}

uint64_t ksm_xxh64(const void *data, size_t len, uint64_t seed)
{
    const uint8_t *p = data;
    const uint8_t *end = p + len;
    uint64_t h;

    if (len >= 32) {
        const uint8_t *limit = end - 32;
        uint64_t v1 = seed + P64_1 + P64_2;
        uint64_t v2 = seed + P64_2;
        uint64_t v3 = seed;
        uint64_t v4 = seed - P64_1;
        do {
            v1 = xxh64_round(v1, read64(p));
            v2 = xxh64_round(v2, read64(p + 8));
            v3 = xxh64_round(v3, read64(p + 16));
            v4 = xxh64_round(v4, read64(p + 24));
            p += 32;
        } while (p <= limit);
        h = rotl64(v1, 1) + rotl64(v2, 7) + rotl64(v3, 12) + rotl64(v4, 18);
        h = xxh64_merge_round(h, v1);
        h = xxh64_merge_round(h, v2);
        h = xxh64_merge_round(h, v3);
        h = xxh64_merge_round(h, v4);
    } else {
        h = seed + P64_5;
    }
    h += (uint64_t)len;

    while (p + 8 <= end) {
        h ^= xxh64_round(0, read64(p));
        h = rotl64(h, 27) * P64_1 + P64_4;
        p += 8;
    }
    if (p + 4 <= end) {
        h ^= (uint64_t)read32(p) * P64_1;
        h = rotl64(h, 23) * P64_2 + P64_3;
        p += 4;
    }
    while (p < end) {
        h ^= (uint64_t)(*p) * P64_5;
        h = rotl64(h, 11) * P64_1;
        p++;
    }
    h ^= h >> 33;
    h *= P64_2;
    h ^= h >> 29;
    h *= P64_3;
    h ^= h >> 32;
    return h;
}

uint32_t calc_checksum(const uint8_t *page)
{
    return (uint32_t)ksm_xxh64(page, KSM_PAGE_SIZE, 0);
}

void calc_checksums(const uint8_t *pages, size_t npages, uint32_t *out)
{
    for (size_t i = 0; i < npages; i++)
        out[i] = calc_checksum(pages + i * KSM_PAGE_SIZE);
}

int memcmp_pages(const uint8_t *a, const uint8_t *b)
{
    /* memcmp's sign only: an unsigned-byte lexicographic order */
    int r = memcmp(a, b, KSM_PAGE_SIZE);
    return (r > 0) - (r < 0);
}
