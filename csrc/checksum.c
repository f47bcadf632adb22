/*
 * checksum.c - calc_checksum() and memcmp_pages() as mm/ksm.c and mm/util.c have them.
 *
 * The kernel's checksum is xxhash(page, PAGE_SIZE, 0) truncated to 32 bits, where
 * xxhash() is XXH64 on 64-bit kernels.  XXH64 is written here from the public
 * specification (xxHash's doc/xxhash_spec.md): 32-byte stripes in four lanes,
 * then the tail, then the avalanche.  Words are read little-endian.
 *
 * calc_checksum() of a whole page has a second form for CPUs with AVX-512 (F, DQ, VL):
 * the four lanes of a stripe are one 256-bit vector, and each round is one vector
 * multiply, add, rotate and multiply.  Scalar XXH64 is bound by the 64-bit multiplier
 * (two multiplies per 8 bytes, about 10 GB/s here); the vector form keeps up with
 * memory (about 20 GB/s).  Both give the same bits; the CPU's best runs by default.
 */
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define KSM_HAVE_AVX512_CSUM 1
#endif

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

/* the four lanes into one value, after the last full stripe */
static inline uint64_t xxh64_converge(uint64_t v1, uint64_t v2, uint64_t v3, uint64_t v4)
{
    uint64_t h = rotl64(v1, 1) + rotl64(v2, 7) + rotl64(v3, 12) + rotl64(v4, 18);
    h = xxh64_merge_round(h, v1);
    h = xxh64_merge_round(h, v2);
    h = xxh64_merge_round(h, v3);
    return xxh64_merge_round(h, v4);
}

static inline uint64_t xxh64_avalanche(uint64_t h)
{
    h ^= h >> 33;
    h *= P64_2;
    h ^= h >> 29;
    h *= P64_3;
    h ^= h >> 32;
    return h;
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
        h = xxh64_converge(v1, v2, v3, v4);
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
    return xxh64_avalanche(h);
}

static uint64_t page_xxh64_scalar(const uint8_t *page)
{
    return ksm_xxh64(page, KSM_PAGE_SIZE, 0);
}

#ifdef KSM_HAVE_AVX512_CSUM
/* XXH64(page, 4096, seed 0): 128 stripes exactly, so no tail */
__attribute__((target("avx512f,avx512dq,avx512vl")))
static uint64_t page_xxh64_avx512(const uint8_t *page)
{
    __m256i acc = _mm256_set_epi64x((long long)(0 - P64_1), 0, (long long)P64_2,
                                    (long long)(P64_1 + P64_2));
    const __m256i p1 = _mm256_set1_epi64x((long long)P64_1);
    const __m256i p2 = _mm256_set1_epi64x((long long)P64_2);
    for (size_t i = 0; i < KSM_PAGE_SIZE; i += 32) {
        __m256i in = _mm256_loadu_si256((const __m256i *)(const void *)(page + i));
        acc = _mm256_add_epi64(acc, _mm256_mullo_epi64(in, p2));
        acc = _mm256_rol_epi64(acc, 31);
        acc = _mm256_mullo_epi64(acc, p1);
    }
    uint64_t v[4];
    _mm256_storeu_si256((__m256i *)(void *)v, acc);
    uint64_t h = xxh64_converge(v[0], v[1], v[2], v[3]) + KSM_PAGE_SIZE;
    return xxh64_avalanche(h);
}
#endif

/* the XXH64 of one page, in the CPU's best form; calc_checksum() keeps 32 bits of it */
static uint64_t (*page_xxh64_fn)(const uint8_t *page);

int ksm_checksum_select(int impl)
{
#ifdef KSM_HAVE_AVX512_CSUM
    __builtin_cpu_init();
    int avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                 __builtin_cpu_supports("avx512vl");
#else
    int avx512 = 0;
#endif
    if (impl == KSM_CSUM_BEST)
        impl = avx512 ? KSM_CSUM_AVX512 : KSM_CSUM_SCALAR;
    if (impl == KSM_CSUM_SCALAR) {
        page_xxh64_fn = page_xxh64_scalar;
        return impl;
    }
#ifdef KSM_HAVE_AVX512_CSUM
    if (impl == KSM_CSUM_AVX512 && avx512) {
        page_xxh64_fn = page_xxh64_avx512;
        return impl;
    }
#endif
    return -1;
}

#ifdef __GNUC__
/* choose at load time, before any thread can race on the first use */
__attribute__((constructor)) static void checksum_init(void)
{
    ksm_checksum_select(KSM_CSUM_BEST);
}
#endif

int ksm_checksum_impl(void)
{
    if (!page_xxh64_fn)
        ksm_checksum_select(KSM_CSUM_BEST);
    return page_xxh64_fn == page_xxh64_scalar ? KSM_CSUM_SCALAR : KSM_CSUM_AVX512;
}

uint32_t calc_checksum(const uint8_t *page)
{
    if (!page_xxh64_fn)
        ksm_checksum_select(KSM_CSUM_BEST);
    return (uint32_t)page_xxh64_fn(page);
}

void ksm_page_hashes(const uint8_t *pages, size_t npages, uint64_t *out)
{
    if (!page_xxh64_fn)
        ksm_checksum_select(KSM_CSUM_BEST);
    for (size_t i = 0; i < npages; i++)
        out[i] = page_xxh64_fn(pages + i * KSM_PAGE_SIZE);
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
