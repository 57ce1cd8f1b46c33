/* Exact pairwise intersection counts of binary masks, and the per-image sums the metrics need.
 *
 * amisbench.metrics calls these on CPU when the extension was built (pip builds it with the package; without a
 * C compiler the package installs without it and the metrics use their torch/numpy path, same numbers).
 *
 * gram(a, b, B, ka, kb, H, W, out, kernel="auto", sums=None)
 *     a: (B, ka, H, W) and b: (B, kb, H, W) masks, one byte a pixel (0 = unset, anything else = set), each
 *     mask's rows contiguous (any strides between masks and images: a slice of the samples needs no copy);
 *     out: (B, K, K) float64 C-contiguous with K = ka + kb, written with |x_i & x_j| of every pair of the
 *     K masks of each image (a's masks first); the diagonal holds the areas.
 *
 *     Per image, in one read of its masks: each mask is packed to bits (64 pixels a word); the OR of the
 *     packed masks gives the smallest rectangle (window) holding every set pixel; each mask's window is
 *     laid out as one dense bit string (h * w bits); every pair is counted as the popcount of the AND of
 *     two strings, eight pairs a vector where the CPU has AVX-512. All counts are integers (exact).
 *     sums = (empty, cross, self, blank, reader): also the GED sums of prefix_sums (a: the samples, b: the
 *     readers), each image's right after its counts, while they are in cache.
 *
 * prefix_sums(counts, B, N, m, empty, out_cross, out_self, out_blank, out_reader)
 *     counts: (B, N + m, N + m) float64 from gram (N samples first, then m readers). Per image and for every
 *     prefix n = 1..N of the samples, the sums the GED needs, with IoU = |x & y| / |x | y| and IoU = empty
 *     for two empty masks:
 *       out_cross[b, n-1] = sum over i < n, j < m of IoU(s_i, y_j)
 *       out_self[b, n-1]  = sum over i, i' < n of IoU(s_i, s_i')
 *       out_blank[b, n-1] = number of empty masks among s_0 .. s_{n-1}
 *     and out_reader[b] = sum over j, j' < m of IoU(y_j, y_j').
 *
 * assignment_mean(values, B, n, m, out)
 *     values: (B, n, m) float64 (IoU of sample i and reader j). Both sets are repeated to L = lcm(n, m)
 *     members (the n x m matrix tiled) and matched one to one maximising the sum of values (the Hungarian
 *     matched IoU); out[b] = that maximum / L. Solved as the equivalent transportation problem by successive
 *     shortest paths over the m readers (transport_max below).
 *
 * kernel() names the kernels gram uses on this CPU ("avx512": AVX-512 BW/DQ/VPOPCNTDQ; "popcnt"; "generic":
 * plain C, any CPU); kernels() lists all it can run, and gram(..., kernel=name) forces one (tests).
 * Every function releases the GIL while it runs.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* x86-64 kernels (AVX-512, POPCNT) chosen at run time; -DAMIS_PORTABLE builds only the plain C ones, as on
 * other CPUs (a test builds it so). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(AMIS_PORTABLE)
#include <immintrin.h>
#define AMIS_X86 1
#endif

typedef uint64_t word;

/* ---------------------------------------------------------------------------------------------------- */
/* Packing bytes to bits                                                                                   */
/* ---------------------------------------------------------------------------------------------------- */

/* 8 bytes -> 8 bits (byte k -> bit k), any nonzero byte counting as set. */
static inline word pack8(const unsigned char *p) {
    word x;
    memcpy(&x, p, 8);
    x |= x >> 4;
    x |= x >> 2;
    x |= x >> 1;
    x &= 0x0101010101010101ULL;
    return (x * 0x0102040810204080ULL) >> 56;
}

/* nbits bytes -> ceil(nbits / 64) words, bit i of the string = byte i != 0; unused high bits are 0. Word t
 * goes to out[8 t] (masks interleaved by 8, as the window strings: AT below) and is OR-ed into uni[t] (the
 * union of the masks of an image). */
static void pack_generic(const unsigned char *p, size_t nbits, word *out, word *uni) {
    size_t full = nbits / 64, i;
    for (i = 0; i < full; i++) {
        const unsigned char *q = p + 64 * i;
        word w = 0;
        for (int k = 0; k < 8; k++) w |= pack8(q + 8 * k) << (8 * k);
        out[8 * i] = w;
        uni[i] |= w;
    }
    size_t rest = nbits - 64 * full;
    if (rest) {
        word w = 0;
        const unsigned char *q = p + 64 * full;
        for (size_t k = 0; k < rest; k++) w |= (word)(q[k] != 0) << k;
        out[8 * full] = w;
        uni[full] |= w;
    }
}

#ifdef AMIS_X86
__attribute__((target("avx512f,avx512bw")))
static void pack_avx512(const unsigned char *p, size_t nbits, word *out, word *uni) {
    size_t full = nbits / 64, i;
    for (i = 0; i < full; i++) {
        __m512i v = _mm512_loadu_si512((const void *)(p + 64 * i));
        word w = (word)_mm512_test_epi8_mask(v, v);
        out[8 * i] = w;
        uni[i] |= w;
    }
    size_t rest = nbits - 64 * full;
    if (rest) {
        __mmask64 keep = (((__mmask64)1) << rest) - 1;
        __m512i v = _mm512_maskz_loadu_epi8(keep, (const void *)(p + 64 * full));
        word w = (word)_mm512_test_epi8_mask(v, v);
        out[8 * full] = w;
        uni[full] |= w;
    }
}
#endif

/* ---------------------------------------------------------------------------------------------------- */
/* Bit strings                                                                                              */
/* ---------------------------------------------------------------------------------------------------- */

/* Strings of an image (its packed masks, and their windows) are stored interleaved by 8: word t of string
 * i of nw-word strings sits at AT(i, t, nw), so word t of strings 8b..8b+7 fills one 64-byte line. One
 * vector then holds the words of 8 strings: a window piece is cut from 8 masks at once, and a string i is
 * counted against 8 others at once, one count per lane, with no sums across lanes. */
#define AT(i, t, nw) ((((i) >> 3) * (nw) + (t)) * 8 + ((i) & 7))

/* len (1..64) bits of the string s from bit pos on, as the low bits of a word; word t of s is s[step * t]
 * (1: contiguous, 8: interleaved). Reads the word after the one holding pos (keep slack after a string).
 * Branch-free: the row bits of a window rarely line up with the words. */
static inline word get_bits(const word *s, size_t step, size_t pos, unsigned len) {
    size_t i = pos >> 6;
    unsigned off = (unsigned)(pos & 63);
    word v = (s[step * i] >> off) | ((s[step * (i + 1)] << 1) << (63 - off));
    return v & (~(word)0 >> (64 - len));
}

static inline unsigned ctz64(word v) { return (unsigned)__builtin_ctzll(v); }
static inline unsigned clz64(word v) { return (unsigned)__builtin_clzll(v); }

/* ---------------------------------------------------------------------------------------------------- */
/* Counting                                                                                                 */
/* ---------------------------------------------------------------------------------------------------- */

/* Rows i of the counts from column 8 * (i / 8) on were computed: copy them to the columns below. */
static void mirror(size_t k, double *out) {
    for (size_t i = 8; i < k; i++)
        for (size_t j = 0; j < (i & ~(size_t)7); j++) out[i * k + j] = out[j * k + i];
}

/* String i against string j, one word at a time; inlined into gram_generic and, compiled with the POPCNT
 * instruction, into gram_popcnt. */
static inline __attribute__((always_inline)) void gram_words(const word *strings, size_t k, size_t nw,
                                                              double *out) {
    for (size_t i = 0; i < k; i++)
        for (size_t j = i & ~(size_t)7; j < k; j++) {
            uint64_t c = 0;
            for (size_t t = 0; t < nw; t++)
                c += (uint64_t)__builtin_popcountll(strings[AT(i, t, nw)] & strings[AT(j, t, nw)]);
            out[i * k + j] = (double)c;
        }
    mirror(k, out);
}

static void gram_generic(const word *strings, size_t k, size_t nw, double *out) { gram_words(strings, k, nw, out); }

#ifdef AMIS_X86
__attribute__((target("popcnt")))
static void gram_popcnt(const word *strings, size_t k, size_t nw, double *out) { gram_words(strings, k, nw, out); }

/* String i against the 8 strings of a block: broadcast its word t, AND with the block's words t, popcount
 * per lane. Two blocks at a time share the broadcasts. Lanes past k are zero strings (counts 0, not stored). */
__attribute__((target("avx512f,avx512dq,avx512vpopcntdq")))
static void gram_avx512(const word *strings, size_t k, size_t nw, double *out) {
    size_t blocks = (k + 7) / 8;
    for (size_t i = 0; i < k; i++) {
        const word *x = strings + AT(i, 0, nw); /* word t at x[8 * t] */
        double *row = out + i * k;
        size_t b = i >> 3;
        for (; b + 2 <= blocks; b += 2) {
            const word *y0 = strings + b * nw * 8, *y1 = y0 + nw * 8;
            __m512i a0 = _mm512_setzero_si512(), a1 = a0;
            for (size_t t = 0; t < nw; t++) {
                __m512i xv = _mm512_set1_epi64((long long)x[8 * t]);
                a0 = _mm512_add_epi64(a0, _mm512_popcnt_epi64(_mm512_and_si512(xv, _mm512_loadu_si512((const void *)(y0 + 8 * t)))));
                a1 = _mm512_add_epi64(a1, _mm512_popcnt_epi64(_mm512_and_si512(xv, _mm512_loadu_si512((const void *)(y1 + 8 * t)))));
            }
            size_t left = k - 8 * (b + 1);
            _mm512_storeu_pd(row + 8 * b, _mm512_cvtepu64_pd(a0));
            _mm512_mask_storeu_pd(row + 8 * (b + 1), left >= 8 ? 0xFF : (__mmask8)((1u << left) - 1),
                                  _mm512_cvtepu64_pd(a1));
        }
        if (b < blocks) {
            const word *y0 = strings + b * nw * 8;
            __m512i a0 = _mm512_setzero_si512();
            for (size_t t = 0; t < nw; t++) {
                __m512i xv = _mm512_set1_epi64((long long)x[8 * t]);
                a0 = _mm512_add_epi64(a0, _mm512_popcnt_epi64(_mm512_and_si512(xv, _mm512_loadu_si512((const void *)(y0 + 8 * t)))));
            }
            size_t left = k - 8 * b;
            _mm512_mask_storeu_pd(row + 8 * b, left >= 8 ? 0xFF : (__mmask8)((1u << left) - 1),
                                  _mm512_cvtepu64_pd(a0));
        }
    }
    mirror(k, out);
}
#endif

typedef void (*pack_fn)(const unsigned char *, size_t, word *, word *);
typedef void (*gram_fn)(const word *, size_t, size_t, double *);

/* A window (rows r0..r1, columns c0..c1) of each of the packed masks (layout AT, nwords words each, blocks of
 * 8) as one dense string of h * w bits (layout AT, nw words each; strings zeroed before). The pieces (a row,
 * or 64 columns of it) land at the same places in every string, so each piece is placed in all strings
 * before the next. A piece that ends in the next word spills its high bits there; one that does not
 * spills 0 (possibly into the next block's first word, or the slack line after the last block). */
typedef struct {
    size_t width, r0, r1, c0, c1, nwords, nw, blocks;
} window;

static void windows_generic(const word *packed, size_t k, const window *wd, word *strings) {
    size_t pos = 0;
    for (size_t r = wd->r0; r < wd->r1; r++) {
        for (size_t c = wd->c0; c < wd->c1; c += 64) {
            unsigned len = (unsigned)(wd->c1 - c < 64 ? wd->c1 - c : 64), off = (unsigned)(pos & 63);
            size_t from = r * wd->width + c, o = pos >> 6;
            for (size_t i = 0; i < k; i++) {
                word v = get_bits(packed + AT(i, 0, wd->nwords), 8, from, len);
                word *dst = strings + AT(i, o, wd->nw);
                dst[0] |= v << off;
                dst[8] |= (v >> 1) >> (63 - off);
            }
            pos += len;
        }
    }
}

#ifdef AMIS_X86
/* the same, 8 masks (one block) a vector; AVX-512 shifts by 64 give 0, so no split shifts are needed */
__attribute__((target("avx512f")))
static void windows_avx512(const word *packed, size_t k, const window *wd, word *strings) {
    (void)k;
    size_t pos = 0;
    for (size_t r = wd->r0; r < wd->r1; r++) {
        for (size_t c = wd->c0; c < wd->c1; c += 64) {
            unsigned len = (unsigned)(wd->c1 - c < 64 ? wd->c1 - c : 64), off = (unsigned)(pos & 63);
            size_t from = r * wd->width + c, o = pos >> 6, at = from >> 6;
            unsigned shift = (unsigned)(from & 63);
            __m512i right = _mm512_set1_epi64((long long)shift), left = _mm512_set1_epi64(64 - (long long)shift);
            __m512i keep = _mm512_set1_epi64((long long)(~(word)0 >> (64 - len)));
            __m512i put = _mm512_set1_epi64((long long)off), spill = _mm512_set1_epi64(64 - (long long)off);
            for (size_t b = 0; b < wd->blocks; b++) {
                const word *src = packed + (b * wd->nwords + at) * 8;
                __m512i v = _mm512_or_si512(_mm512_srlv_epi64(_mm512_loadu_si512((const void *)src), right),
                                            _mm512_sllv_epi64(_mm512_loadu_si512((const void *)(src + 8)), left));
                v = _mm512_and_si512(v, keep);
                word *dst = strings + (b * wd->nw + o) * 8;
                __m512i d0 = _mm512_loadu_si512((const void *)dst), d1 = _mm512_loadu_si512((const void *)(dst + 8));
                _mm512_storeu_si512((void *)dst, _mm512_or_si512(d0, _mm512_sllv_epi64(v, put)));
                _mm512_storeu_si512((void *)(dst + 8), _mm512_or_si512(d1, _mm512_srlv_epi64(v, spill)));
            }
            pos += len;
        }
    }
}
#endif

typedef void (*windows_fn)(const word *, size_t, const window *, word *);

typedef struct {
    pack_fn pack;
    windows_fn windows;
    gram_fn gram;
} kernels;

/* The kernels named want ("auto": the fastest this CPU runs; "generic": plain C; "popcnt", "avx512": those
 * instruction sets, for tests) and their name; NULL if this CPU or build lacks them. */
static const char *choose_kernels(const char *want, kernels *kn) {
    kn->pack = pack_generic;
    kn->windows = windows_generic;
    kn->gram = gram_generic;
    if (!strcmp(want, "generic")) return "generic";
    int automatic = !strcmp(want, "auto");
#ifdef AMIS_X86
    __builtin_cpu_init();
    int avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vpopcntdq");
    if (avx512 && (automatic || !strcmp(want, "avx512"))) {
        kn->pack = pack_avx512;
        kn->windows = windows_avx512;
        kn->gram = gram_avx512;
        return "avx512";
    }
    if (__builtin_cpu_supports("popcnt") && (automatic || !strcmp(want, "popcnt"))) {
        kn->gram = gram_popcnt;
        return "popcnt";
    }
#endif
    return automatic ? "generic" : NULL;
}

/* The GED sums gram_all forms per image right after its counts, while they are in cache (prefix_sums: a's
 * masks are the samples, b's the readers); defined with prefix_sums below. */
typedef double (*iou_sum_fn)(const double *, const double *, size_t, double, double);
typedef struct {
    double empty;
    double *cross, *self, *blank, *reader; /* (B, n_s), (B, n_s), (B, n_s), (B,) */
} ged_sums;
static iou_sum_fn choose_iou_sum(void);
static void prefix_one(const double *c, size_t n_s, size_t m, double empty, iou_sum_fn iou_sum, double *areas,
                       double *cross, double *self, double *blank, double *reader);

/* The masks of a batch: mask i of image b starts at buf + b * image + i * mask (byte strides, any sign);
 * each mask is height * width contiguous bytes. */
typedef struct {
    const unsigned char *buf;
    ptrdiff_t image, mask;
    size_t count;
} mask_set;

/* The counts of image img: k = a->count + b->count masks of hw = height * width bytes each. packed holds
 * the packed masks (layout AT, nwords = ceil(hw / 64) words each, lanes past k zero) and a slack line, uni
 * nwords + 1 words, strings the k window strings (at most nwords words each, layout AT) and a slack line.
 * Returns 0 if every mask is empty. */
static int image_counts(const mask_set *a, const mask_set *b, size_t img, size_t height, size_t width,
                        word *packed, word *uni, word *strings, const kernels *kn, double *out) {
    size_t ka = a->count, k = ka + b->count, hw = height * width, nwords = (hw + 63) / 64;
    memset(uni, 0, nwords * sizeof(word));
    for (size_t i = 0; i < k; i++) {
        const mask_set *set = i < ka ? a : b;
        size_t j = i < ka ? i : i - ka;
        const unsigned char *src = set->buf + (ptrdiff_t)img * set->image + (ptrdiff_t)j * set->mask;
        kn->pack(src, hw, packed + AT(i, 0, nwords), uni);
    }
    /* occupied rows and columns of the union */
    size_t r0 = height, r1 = 0, c0 = width, c1 = 0;
    for (size_t r = 0; r < height; r++) {
        for (size_t c = 0; c < width; c += 64) {
            unsigned len = (unsigned)(width - c < 64 ? width - c : 64);
            word v = get_bits(uni, 1, r * width + c, len);
            if (!v) continue;
            if (r < r0) r0 = r;
            r1 = r + 1;
            size_t lo = c + ctz64(v), hi = c + 64 - clz64(v);
            if (lo < c0) c0 = lo;
            if (hi > c1) c1 = hi;
        }
    }
    if (r1 == 0) {
        memset(out, 0, k * k * sizeof(double));
        return 0;
    }
    window wd = {width, r0, r1, c0, c1, nwords, ((r1 - r0) * (c1 - c0) + 63) / 64, (k + 7) / 8};
    memset(strings, 0, (wd.blocks * wd.nw + 1) * 8 * sizeof(word));
    kn->windows(packed, k, &wd, strings);
    kn->gram(strings, k, wd.nw, out);
    return 1;
}

static int gram_all(const mask_set *a, const mask_set *b, size_t bsz, size_t height, size_t width, const kernels *kn,
                    const ged_sums *sums, double *out) {
    size_t k = a->count + b->count, hw = height * width, nwords = (hw + 63) / 64, blocks = (k + 7) / 8;
    size_t lines = (blocks * nwords + 1) * 8; /* blocks of 8 strings of at most nwords words, a slack line */
    word *packed = (word *)calloc(lines, sizeof(word)); /* zero: the lanes past k stay empty strings */
    word *strings = (word *)malloc(lines * sizeof(word));
    word *uni = (word *)malloc((nwords + 1) * sizeof(word));
    double *areas = (double *)malloc(k * sizeof(double));
    if (!packed || !strings || !uni || !areas) {
        free(packed);
        free(strings);
        free(uni);
        free(areas);
        return -1;
    }
    uni[nwords] = 0;
    iou_sum_fn iou_sum = choose_iou_sum();
    size_t n_s = a->count;
    for (size_t i = 0; i < bsz; i++) {
        image_counts(a, b, i, height, width, packed, uni, strings, kn, out + i * k * k);
        if (sums)
            prefix_one(out + i * k * k, n_s, b->count, sums->empty, iou_sum, areas, sums->cross + i * n_s,
                       sums->self + i * n_s, sums->blank + i * n_s, sums->reader + i);
    }
    free(packed);
    free(strings);
    free(uni);
    free(areas);
    return 0;
}

/* ---------------------------------------------------------------------------------------------------- */
/* GED sums of every prefix                                                                                */
/* ---------------------------------------------------------------------------------------------------- */

static inline double iou_of(double inter, double area_x, double area_y, double empty) {
    double uni = area_x + area_y - inter;
    return uni > 0 ? inter / uni : empty;
}

/* sum over j < count of IoU(x, y_j) from |x & y_j| = inter[j], |x| = area, |y_j| = areas[j] */
static double iou_sum_generic(const double *inter, const double *areas, size_t count, double area, double empty) {
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    size_t j = 0;
    for (; j + 4 <= count; j += 4) {
        s0 += iou_of(inter[j], area, areas[j], empty);
        s1 += iou_of(inter[j + 1], area, areas[j + 1], empty);
        s2 += iou_of(inter[j + 2], area, areas[j + 2], empty);
        s3 += iou_of(inter[j + 3], area, areas[j + 3], empty);
    }
    for (; j < count; j++) s0 += iou_of(inter[j], area, areas[j], empty);
    return (s0 + s1) + (s2 + s3);
}

#ifdef AMIS_X86
/* the same, 8 pairs a vector (the same divisions; the sum in another order) */
__attribute__((target("avx512f")))
static double iou_sum_avx512(const double *inter, const double *areas, size_t count, double area, double empty) {
    __m512d acc = _mm512_setzero_pd(), ax = _mm512_set1_pd(area), fill = _mm512_set1_pd(empty);
    __m512d one = _mm512_set1_pd(1.0), zero = _mm512_setzero_pd();
    for (size_t j = 0; j < count; j += 8) {
        size_t left = count - j;
        __mmask8 lanes = left >= 8 ? 0xFF : (__mmask8)((1u << left) - 1);
        __m512d in = _mm512_maskz_loadu_pd(lanes, inter + j), ay = _mm512_maskz_loadu_pd(lanes, areas + j);
        __m512d uni = _mm512_sub_pd(_mm512_add_pd(ax, ay), in);
        __mmask8 some = _mm512_mask_cmp_pd_mask(lanes, uni, zero, _CMP_GT_OQ);
        __m512d iou = _mm512_div_pd(in, _mm512_max_pd(uni, one));
        acc = _mm512_mask_add_pd(acc, lanes, acc, _mm512_mask_blend_pd(some, fill, iou));
    }
    return _mm512_reduce_add_pd(acc);
}
#endif

static iou_sum_fn choose_iou_sum(void) {
#ifdef AMIS_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return iou_sum_avx512;
#endif
    return iou_sum_generic;
}

/* The GED sums of one image (counts c: k x k, k = n_s + m; areas: k doubles of scratch); outputs as in
 * prefix_sums, for this image (cross, self, blank: n_s each; reader: one). */
static void prefix_one(const double *c, size_t n_s, size_t m, double empty, iou_sum_fn iou_sum, double *areas,
                       double *cross, double *self, double *blank, double *reader) {
    size_t k = n_s + m;
    for (size_t i = 0; i < k; i++) areas[i] = c[i * k + i];
    double rd = 0;
    for (size_t j = 0; j < m; j++) rd += iou_sum(c + (n_s + j) * k + n_s, areas + n_s, m, areas[n_s + j], empty);
    *reader = rd;
    double cr = 0, sf = 0, bl = 0;
    for (size_t i = 0; i < n_s; i++) {
        const double *row = c + i * k;
        double area = areas[i];
        cr += iou_sum(row + n_s, areas + n_s, m, area, empty);
        sf += 2 * iou_sum(row, areas, i, area, empty) + (area > 0 ? 1.0 : empty);
        bl += area == 0;
        cross[i] = cr;
        self[i] = sf;
        blank[i] = bl;
    }
}

static int prefix_sums(const double *counts, size_t bsz, size_t n_s, size_t m, double empty, double *cross,
                       double *self, double *blank, double *reader) {
    size_t k = n_s + m;
    double *areas = (double *)malloc(k * sizeof(double));
    if (!areas) return -1;
    iou_sum_fn iou_sum = choose_iou_sum();
    for (size_t b = 0; b < bsz; b++)
        prefix_one(counts + b * k * k, n_s, m, empty, iou_sum, areas, cross + b * n_s, self + b * n_s,
                   blank + b * n_s, reader + b);
    free(areas);
    return 0;
}

/* ---------------------------------------------------------------------------------------------------- */
/* Assignment                                                                                              */
/* ---------------------------------------------------------------------------------------------------- */

static size_t gcd_size(size_t x, size_t y) {
    while (y) {
        size_t t = x % y;
        x = y;
        y = t;
    }
    return x;
}

/* The best matching of the tiling as a transportation problem: sample i sends L / n units, reader j takes
 * L / m, a unit from i to j is worth val[i][j]; the tiling's one-to-one matchings are exactly the integer
 * flows (repeated members are interchangeable). Successive shortest paths: each unit goes along the
 * cheapest path in the residual graph, i -> reader j1 -> (a sample i' moves from j1 to) j2 -> ... -> a reader
 * with room, which keeps the flow optimal for its size. Collapsing each step through a sample i' gives an
 * edge j1 -> j2 of weight min over i' on j1 of val[i'][j1] - val[i'][j2]; only full readers need such edges
 * (an optimal flow has no cheaper way through a reader that still has room), so the search runs over the m
 * readers (Bellman-Ford) instead of the L columns of the tiling. A path is taken over another only if it is
 * cheaper by more than SAME (a cycle of readers can sum to +-1 ulp instead of 0). Returns the total value. */
#define SAME 1e-12
static double transport_max(const double *val, size_t n, size_t m, size_t per_sample, size_t per_reader,
                            size_t *flow, size_t *room, double *dist, size_t *via_reader, size_t *via_sample,
                            double *edge, size_t *edge_sample) {
    memset(flow, 0, n * m * sizeof(size_t));
    for (size_t j = 0; j < m; j++) room[j] = per_reader;
    const size_t none = (size_t)-1;
    double total = 0;
    for (size_t i = 0; i < n; i++) {
        const double *vi = val + i * m;
        for (size_t unit = 0; unit < per_sample; unit++) {
            int any_full = 0;
            for (size_t j = 0; j < m; j++) {
                dist[j] = -vi[j];
                via_reader[j] = none;
                any_full |= room[j] == 0;
            }
            if (any_full) {
                /* edges out of the full readers */
                for (size_t j = 0; j < m; j++) {
                    if (room[j]) continue;
                    for (size_t j2 = 0; j2 < m; j2++) {
                        edge[j * m + j2] = 1e300;
                        edge_sample[j * m + j2] = none;
                    }
                    for (size_t s = 0; s < n; s++) {
                        if (!flow[s * m + j]) continue;
                        const double *vs = val + s * m;
                        for (size_t j2 = 0; j2 < m; j2++) {
                            double w = vs[j] - vs[j2];
                            if (j2 != j && w < edge[j * m + j2]) {
                                edge[j * m + j2] = w;
                                edge_sample[j * m + j2] = s;
                            }
                        }
                    }
                }
                for (size_t pass = 0; pass < m; pass++) {
                    int changed = 0;
                    for (size_t j = 0; j < m; j++) {
                        if (room[j]) continue;
                        for (size_t j2 = 0; j2 < m; j2++) {
                            if (edge_sample[j * m + j2] == none) continue;
                            double d = dist[j] + edge[j * m + j2];
                            if (d < dist[j2] - SAME) {
                                dist[j2] = d;
                                via_reader[j2] = j;
                                via_sample[j2] = edge_sample[j * m + j2];
                                changed = 1;
                            }
                        }
                    }
                    if (!changed) break;
                }
            }
            size_t end = none;
            for (size_t j = 0; j < m; j++)
                if (room[j] && (end == none || dist[j] < dist[end])) end = j;
            total -= dist[end];
            room[end]--;
            size_t j = end;
            for (size_t steps = 0; via_reader[j] != none && steps < m; steps++) {
                size_t s = via_sample[j], from = via_reader[j];  /* s is on `from` (flow >= 1): an edge's sample */
                flow[s * m + j]++;
                flow[s * m + from]--;
                j = from;
            }
            flow[i * m + j]++;
        }
    }
    return total;
}

static int assignment_mean(const double *values, size_t bsz, size_t n, size_t m, double *out) {
    size_t size = n / gcd_size(n, m) * m;
    size_t *idx = (size_t *)malloc((n * m + 4 * m + m * m) * sizeof(size_t));
    double *buf = (double *)malloc((m + m * m) * sizeof(double));
    if (!idx || !buf) {
        free(idx);
        free(buf);
        return -1;
    }
    size_t *flow = idx, *room = flow + n * m, *via_reader = room + m, *via_sample = via_reader + m;
    size_t *edge_sample = via_sample + m;
    double *dist = buf, *edge = buf + m;
    for (size_t b = 0; b < bsz; b++)
        out[b] = transport_max(values + b * n * m, n, m, size / n, size / m, flow, room, dist, via_reader,
                               via_sample, edge, edge_sample) /
                 (double)size;
    free(idx);
    free(buf);
    return 0;
}

/* ---------------------------------------------------------------------------------------------------- */
/* Python                                                                                                  */
/* ---------------------------------------------------------------------------------------------------- */

static int need(Py_buffer *buf, size_t bytes, const char *name) {
    if (!PyBuffer_IsContiguous(buf, 'C') || (size_t)buf->len < bytes) {
        PyErr_Format(PyExc_ValueError, "%s: expected a C-contiguous buffer of at least %zu bytes, got %zd", name,
                     bytes, buf->len);
        return 0;
    }
    return 1;
}

/* None, or a MemoryError where rc says an allocation failed */
static PyObject *none_or_no_memory(int rc) {
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* The masks in obj as a mask_set: a buffer of shape (B, k, H, W), one byte an item, rows contiguous (strides
 * W and 1; any strides between masks and images). Fills view (release it) and set; 0 with ValueError. */
static int get_masks(PyObject *obj, const char *name, Py_ssize_t bsz, Py_ssize_t k, Py_ssize_t height,
                     Py_ssize_t width, Py_buffer *view, mask_set *set) {
    if (PyObject_GetBuffer(obj, view, PyBUF_STRIDED_RO) < 0) return 0;
    const Py_ssize_t *sh = view->shape, *st = view->strides;
    int ok = view->ndim == 4 && view->itemsize == 1 && sh[0] == bsz && sh[1] == k && sh[2] == height &&
             sh[3] == width && (height <= 1 || st[2] == width) && (width <= 1 || st[3] == 1);
    if (!ok) {
        PyErr_Format(PyExc_ValueError,
                     "%s: expected masks of shape (%zd, %zd, %zd, %zd), one byte a pixel, rows contiguous", name,
                     bsz, k, height, width);
        PyBuffer_Release(view);
        return 0;
    }
    set->buf = (const unsigned char *)view->buf;
    set->image = st[0];
    set->mask = st[1];
    set->count = (size_t)k;
    return 1;
}

static PyObject *py_gram(PyObject *self, PyObject *args) {
    PyObject *a_obj, *b_obj;
    Py_buffer a, b, out;
    Py_ssize_t bsz, ka, kb, height, width;
    const char *want = "auto";
    PyObject *sums_obj = Py_None;
    kernels kn;
    mask_set sa, sb;
    ged_sums sums;
    Py_buffer sum_bufs[4];
    int have_sums = 0;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOnnnnnw*|sO", &a_obj, &b_obj, &bsz, &ka, &kb, &height, &width, &out, &want,
                          &sums_obj))
        return NULL;
    PyObject *result = NULL;
    if (bsz < 0 || ka < 1 || kb < 0 || height < 1 || width < 1) {
        PyErr_SetString(PyExc_ValueError, "gram: expected B >= 0, ka >= 1, kb >= 0, H >= 1, W >= 1");
        PyBuffer_Release(&out);
        return NULL;
    }
    if (!get_masks(a_obj, "a", bsz, ka, height, width, &a, &sa)) {
        PyBuffer_Release(&out);
        return NULL;
    }
    if (!get_masks(b_obj, "b", bsz, kb, height, width, &b, &sb)) {
        PyBuffer_Release(&a);
        PyBuffer_Release(&out);
        return NULL;
    }
    size_t k = (size_t)(ka + kb);
    if (sums_obj != Py_None) {
        if (kb < 1) {
            PyErr_SetString(PyExc_ValueError, "gram: the GED sums need readers (kb >= 1)");
            goto done;
        }
        if (!PyArg_ParseTuple(sums_obj, "dw*w*w*w*;gram: sums must be (empty, cross, self, blank, reader)",
                              &sums.empty, &sum_bufs[0], &sum_bufs[1], &sum_bufs[2], &sum_bufs[3]))
            goto done;
        have_sums = 1;
        size_t per = (size_t)bsz * ka * sizeof(double);
        if (!need(&sum_bufs[0], per, "cross") || !need(&sum_bufs[1], per, "self") ||
            !need(&sum_bufs[2], per, "blank") || !need(&sum_bufs[3], (size_t)bsz * sizeof(double), "reader"))
            goto done;
        sums.cross = (double *)sum_bufs[0].buf;
        sums.self = (double *)sum_bufs[1].buf;
        sums.blank = (double *)sum_bufs[2].buf;
        sums.reader = (double *)sum_bufs[3].buf;
    }
    if (!choose_kernels(want, &kn)) {
        PyErr_Format(PyExc_ValueError, "gram: kernel %s is not available on this CPU or build", want);
        goto done;
    }
    if (!need(&out, (size_t)bsz * k * k * sizeof(double), "out")) goto done;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = gram_all(&sa, &sb, (size_t)bsz, (size_t)height, (size_t)width, &kn, have_sums ? &sums : NULL,
                  (double *)out.buf);
    Py_END_ALLOW_THREADS
    result = none_or_no_memory(rc);
done:
    if (have_sums)
        for (int i = 0; i < 4; i++) PyBuffer_Release(&sum_bufs[i]);
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *py_prefix_sums(PyObject *self, PyObject *args) {
    Py_buffer counts, cross, own, blank, reader;
    Py_ssize_t bsz, n_s, m;
    double empty;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nnndw*w*w*w*", &counts, &bsz, &n_s, &m, &empty, &cross, &own, &blank, &reader))
        return NULL;
    PyObject *result = NULL;
    if (bsz < 0 || n_s < 1 || m < 1) {
        PyErr_SetString(PyExc_ValueError, "prefix_sums: expected B >= 0, N >= 1, m >= 1");
        goto done;
    }
    size_t k = (size_t)(n_s + m), per = (size_t)bsz * n_s * sizeof(double);
    if (!need(&counts, (size_t)bsz * k * k * sizeof(double), "counts") || !need(&cross, per, "cross") ||
        !need(&own, per, "self") || !need(&blank, per, "blank") ||
        !need(&reader, (size_t)bsz * sizeof(double), "reader"))
        goto done;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = prefix_sums((const double *)counts.buf, (size_t)bsz, (size_t)n_s, (size_t)m, empty, (double *)cross.buf,
                     (double *)own.buf, (double *)blank.buf, (double *)reader.buf);
    Py_END_ALLOW_THREADS
    result = none_or_no_memory(rc);
done:
    PyBuffer_Release(&counts);
    PyBuffer_Release(&cross);
    PyBuffer_Release(&own);
    PyBuffer_Release(&blank);
    PyBuffer_Release(&reader);
    return result;
}

static PyObject *py_assignment_mean(PyObject *self, PyObject *args) {
    Py_buffer values, out;
    Py_ssize_t bsz, n, m;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nnnw*", &values, &bsz, &n, &m, &out)) return NULL;
    PyObject *result = NULL;
    if (bsz < 0 || n < 1 || m < 1) {
        PyErr_SetString(PyExc_ValueError, "assignment_mean: expected B >= 0, n >= 1, m >= 1");
        goto done;
    }
    if (!need(&values, (size_t)bsz * n * m * sizeof(double), "values") ||
        !need(&out, (size_t)bsz * sizeof(double), "out"))
        goto done;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = assignment_mean((const double *)values.buf, (size_t)bsz, (size_t)n, (size_t)m, (double *)out.buf);
    Py_END_ALLOW_THREADS
    result = none_or_no_memory(rc);
done:
    PyBuffer_Release(&values);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *py_kernels(PyObject *self, PyObject *args) {
    kernels kn;
    (void)self;
    (void)args;
    PyObject *names = PyList_New(0);
    if (!names) return NULL;
    static const char *all[] = {"generic", "popcnt", "avx512"};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) {
        if (!choose_kernels(all[i], &kn)) continue;
        PyObject *name = PyUnicode_FromString(all[i]);
        if (!name || PyList_Append(names, name)) {
            Py_XDECREF(name);
            Py_DECREF(names);
            return NULL;
        }
        Py_DECREF(name);
    }
    return names;
}

static PyObject *py_kernel(PyObject *self, PyObject *args) {
    kernels kn;
    (void)self;
    (void)args;
    return PyUnicode_FromString(choose_kernels("auto", &kn));
}

static PyMethodDef methods[] = {
    {"gram", py_gram, METH_VARARGS,
     "gram(a, b, B, ka, kb, H, W, out, kernel='auto'): exact pairwise intersection counts."},
    {"prefix_sums", py_prefix_sums, METH_VARARGS,
     "prefix_sums(counts, B, N, m, empty, cross, self, blank, reader): IoU sums of every sample prefix."},
    {"assignment_mean", py_assignment_mean, METH_VARARGS,
     "assignment_mean(values, B, n, m, out): the best one-to-one matching of the lcm(n, m) tiling, as a mean."},
    {"kernel", py_kernel, METH_NOARGS, "kernel(): the kernels gram uses by default on this CPU."},
    {"kernels", py_kernels, METH_NOARGS, "kernels(): every kernel gram can be asked for on this CPU."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "amisbench._counts",
                                    "Exact mask counts for amisbench.metrics (C).", -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__counts(void) { return PyModule_Create(&module); }
