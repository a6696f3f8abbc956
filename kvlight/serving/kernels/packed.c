/* One decode step of attention over a compressed cache layer, read where it lies (kvlight.serving.kernels).
 *
 * A layer holds, per batch row b and KV head h, exact sink tokens, compressed tokens and exact recent tokens. The
 * compressed tokens' keys and values are mixed-width integer codes, packed and held token-minor: byte column c of
 * batch row b is one contiguous run of tokens, at codes + b * batch_stride + c * column_stride. Slot s (head
 * h = s / r_max, row j = s % r_max of the per-head operand) reads its code as
 *
 *     code = ((col[byte_lo[s]] >> bit_lo[s]) & mask_lo[s]) | (((col[byte_hi[s]] >> bit_hi[s]) & mask_hi[s]) << shift_hi[s])
 *
 * (mask 0: that field is absent; both 0: the slot holds nothing, unless it is a channel kept exactly, read from the
 * exact channels' own token-minor buffer), and decodes affinely: row j of a head's decoder
 * weight [H, r_max, D] times the code, plus the head's bias [H, D] (steps and offsets folded in by the caller).
 *
 * kvl_attend computes, for the G queries q [B, H, G, D] (scaled) of every KV head:
 *
 *   scores   exact tokens: q . k;  compressed tokens, keys coded after RoPE: (q A^T) . code + q . c, in latent space;
 *            keys coded before RoPE: q . rotate_t(A^T code + c), each key rebuilt and rotated in registers;
 *   weights  softmax over every token of (softcap(scores) + mask);
 *   output   exact tokens: p . v;  compressed tokens: (sum_t p_t code_t) A + (sum_t p_t) c, mixed in latent space.
 *
 * Nothing the size of the history is written but the score row. One OpenMP parallel region per call, on the runtime
 * torch itself runs on (the same libgomp), with torch's thread count; work is split over batch rows, heads and token
 * blocks, so one sequence keeps every thread busy. The arithmetic is float32, in GCC's generic vectors of VEC tokens
 * (lowered to the CPU's SIMD).
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define VEC 16          /* tokens per vector */
#define BLOCK 64        /* tokens per score work item, keys in latent space */
#define GROUP_TILE 4    /* queries of one KV head computed together; more take further tiles */
#define DIM_MAX 256     /* widest head the rope path rebuilds (kvlight.serving.kernels.DIM_MAX) */
#define DIM_TILE 8      /* key channels rebuilt at a time, held in registers */
#define PROJ_TILE (4 * VEC) /* latent rows a projected query is accumulated in at a time (4 vectors per query) */
#define RUN_BLOCKS 8        /* RoPE blocks one work item scores at most */

typedef float vec_f __attribute__((vector_size(VEC * sizeof(float))));
typedef int32_t vec_i __attribute__((vector_size(VEC * sizeof(int32_t))));
typedef uint8_t vec_u8 __attribute__((vector_size(VEC)));

/* The stored codes of one kind (K or V) of one layer, and their affine decoder. */
typedef struct {
    const uint8_t *codes;
    int64_t batch_stride, column_stride;
    const int32_t *byte_lo;
    const uint8_t *bit_lo, *mask_lo;
    const int32_t *byte_hi;
    const uint8_t *bit_hi, *mask_hi, *shift_hi;
    const int32_t *exact_col; /* per slot: its column in `exact` (a channel kept exactly, width 16), or -1 */
    const void *exact;        /* exact channels [B, n_exact, tokens] (token-minor), float32 (0) or bfloat16 (1) */
    int64_t exact_batch_stride, exact_col_stride;
    int32_t exact_dtype;
    int32_t r_max;
    const float *weight;   /* [H, r_max, D] */
    const float *weight_t; /* [H, D, r_pad]: the same, transposed, rows zero-padded to a multiple of PROJ_TILE */
    const float *bias;     /* [H, D] */
} packed_kind;

/* Exact tokens [B, H, n, D], float32 (dtype 0) or bfloat16 (dtype 1), contiguous. */
typedef struct {
    const void *keys, *values;
    int64_t tokens;
    int32_t dtype;
} exact_tokens;

/* RoPE of keys coded relative to it: pair i turns channels (first[i], second[i]) by the tables' entry e (row 0 for
 * every batch row when row_stride is 0). block 1: keys coded before RoPE, one entry per compressed token, tables
 * pair-major [P, E] per row (a vector of tokens per pair), each key rebuilt and rotated; block B > 1: keys coded
 * relative to the RoPE of their block of B slots, one entry per block (compressed token i lies in block
 * (lead + i) / B), tables entry-major [E, P] per row (a block's pairs side by side), each query rotated back and
 * projected once per block. pairs 0: keys are not rotated (scored in latent space as they are). */
typedef struct {
    int32_t pairs;
    const int32_t *first, *second;
    const float *cos, *sin;
    int64_t row_stride, entries;
    int32_t block, lead;
} rope_tables;

static inline int slot_used(const packed_kind *kind, int64_t s) {
    return (kind->mask_lo[s] | kind->mask_hi[s]) || kind->exact_col[s] >= 0;
}

/* VEC bytes (floats) from src; only the first n (zeros after) at the end of a row. With AVX-512 a masked load: no
 * element-wise copy and no call, so the vectors around it stay in registers (a copy through memory, or a call to
 * memcpy, makes GCC keep every accumulator of the loop in memory). */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define MASKED_IO 1
static inline vec_u8 load_bytes(const uint8_t *src, int n) {
    const __m128i in = _mm_maskz_loadu_epi8((__mmask16)((1u << n) - 1u), src);
    vec_u8 v;
    memcpy(&v, &in, sizeof v);
    return v;
}

static inline vec_f load_floats(const float *src, int n) {
    const __m512 in = _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1u), src);
    vec_f v;
    memcpy(&v, &in, sizeof v);
    return v;
}

/* The first n floats of x to dst (the rest of dst untouched). */
static inline void store_floats(float *dst, vec_f x, int n) {
    __m512 out;
    memcpy(&out, &x, sizeof out);
    _mm512_mask_storeu_ps(dst, (__mmask16)((1u << n) - 1u), out);
}
#else
static inline vec_u8 load_bytes(const uint8_t *src, int n) {
    vec_u8 v = {0};
    if (__builtin_expect(n == VEC, 1)) memcpy(&v, src, VEC);
    else for (int t = 0; t < n; t++) v[t] = src[t];
    return v;
}

static inline vec_f load_floats(const float *src, int n) {
    vec_f v = {0};
    if (__builtin_expect(n == VEC, 1)) memcpy(&v, src, sizeof v);
    else for (int t = 0; t < n; t++) v[t] = src[t];
    return v;
}

static inline void store_floats(float *dst, vec_f x, int n) {
    if (__builtin_expect(n == VEC, 1)) memcpy(dst, &x, sizeof x);
    else for (int t = 0; t < n; t++) dst[t] = x[t];
}
#endif

/* Bytes -> int32 lanes: one instruction where the CPU has one (GCC 12 scalarises __builtin_convertvector here). */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline vec_i widen(vec_u8 bytes) {
    __m128i in;
    memcpy(&in, &bytes, sizeof in);
    const __m512i wide = _mm512_cvtepu8_epi32(in);
    vec_i out;
    memcpy(&out, &wide, sizeof out);
    return out;
}
#elif defined(__AVX2__)
#include <immintrin.h>
static inline vec_i widen(vec_u8 bytes) {
    __m128i in;
    memcpy(&in, &bytes, sizeof in);
    const __m256i low = _mm256_cvtepu8_epi32(in), high = _mm256_cvtepu8_epi32(_mm_srli_si128(in, 8));
    vec_i out;
    memcpy(&out, &low, sizeof low);
    memcpy((char *)&out + sizeof low, &high, sizeof high);
    return out;
}
#else
static inline vec_i widen(vec_u8 bytes) { return __builtin_convertvector(bytes, vec_i); }
#endif

/* Slot s of batch row b resolved once, so a loop over its tokens reads nothing but the codes: its fields' byte
 * columns at token 0 and how to cut them (form SLOT_LO: one field; SLOT_LO_HI: a code split over two bytes;
 * SLOT_EXACT: a channel kept exactly, float32 or bfloat16). */
enum { SLOT_LO = 0, SLOT_LO_HI = 1, SLOT_EXACT = 2 };
typedef struct {
    const uint8_t *lo, *hi;
    const void *exact;
    int form, exact_bf16, bit_lo, bit_hi, shift_hi, mask_lo, mask_hi;
} slot_reader;

static inline slot_reader slot_at(const packed_kind *kind, int b, int64_t s) {
    slot_reader r = {0};
    if (kind->exact_col[s] >= 0) {
        r.form = SLOT_EXACT;
        r.exact_bf16 = kind->exact_dtype == 1;
        r.exact = (const char *)kind->exact + ((int64_t)b * kind->exact_batch_stride + kind->exact_col[s] * kind->exact_col_stride) * (r.exact_bf16 ? 2 : 4);
        return r;
    }
    const uint8_t *base = kind->codes + (int64_t)b * kind->batch_stride;
    r.lo = base + (int64_t)kind->byte_lo[s] * kind->column_stride;
    r.bit_lo = kind->bit_lo[s];
    r.mask_lo = kind->mask_lo[s];
    r.form = kind->mask_hi[s] ? SLOT_LO_HI : SLOT_LO;
    if (r.form == SLOT_LO_HI) {
        r.hi = base + (int64_t)kind->byte_hi[s] * kind->column_stride;
        r.bit_hi = kind->bit_hi[s];
        r.mask_hi = kind->mask_hi[s];
        r.shift_hi = kind->shift_hi[s];
    }
    return r;
}

/* The codes of the n <= VEC tokens from t0 of a resolved slot of form FORM (a constant where the caller knows it,
 * so the other forms' code folds away), as floats (0 past n). */
static inline __attribute__((always_inline)) vec_f read_slot(const slot_reader *r, int64_t t0, int n, const int form) {
    if (form == SLOT_EXACT) {
        if (!r->exact_bf16) return load_floats((const float *)r->exact + t0, n);
        const uint16_t *half = (const uint16_t *)r->exact + t0;
        vec_i bits;
#if defined(MASKED_IO)
        const __m512i wide = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16((__mmask16)((1u << n) - 1u), half)), 16);
        memcpy(&bits, &wide, sizeof bits);
#else
        bits = (vec_i){0};
        for (int t = 0; t < n; t++) bits[t] = (int32_t)((uint32_t)half[t] << 16); /* bfloat16: a float's top half */
#endif
        vec_f out;
        memcpy(&out, &bits, sizeof out);
        return out;
    }
    vec_i x = (widen(load_bytes(r->lo + t0, n)) >> r->bit_lo) & r->mask_lo;
    if (form == SLOT_LO_HI) x |= ((widen(load_bytes(r->hi + t0, n)) >> r->bit_hi) & r->mask_hi) << r->shift_hi;
    return __builtin_convertvector(x, vec_f);
}

/* exp of VEC floats, to a few ulp (Cephes' polynomial, as in the SIMD math libraries): e^x = 2^k e^r with
 * r = x - k ln 2 in [-ln2/2, ln2/2]; anything below -87.3 (a masked score) gives exactly 0. */
static inline vec_f select_f(vec_i mask, vec_f yes, vec_f no) {
    vec_i a, b;
    memcpy(&a, &yes, sizeof a);
    memcpy(&b, &no, sizeof b);
    const vec_i picked = (mask & a) | (~mask & b);
    vec_f out;
    memcpy(&out, &picked, sizeof out);
    return out;
}

static inline vec_f exp_vec(vec_f x) {
    const vec_f low = (vec_f){0} - 87.3f, high = (vec_f){0} + 88.3f;
    const vec_i masked = x < low;
    x = select_f(masked, low, x);
    x = select_f(x > high, high, x);
    vec_f k = x * 1.44269504088896341f;
    k = __builtin_convertvector(__builtin_convertvector(k + select_f(k >= 0, (vec_f){0} + 0.5f, (vec_f){0} - 0.5f), vec_i), vec_f);
    vec_f r = x - k * 0.693359375f;
    r = r - k * -2.12194440e-4f;
    vec_f p = (vec_f){0} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const vec_i scale = (__builtin_convertvector(k, vec_i) + 127) << 23;
    vec_f two_k;
    memcpy(&two_k, &scale, sizeof two_k);
    return select_f(masked, (vec_f){0}, p * two_k);
}

static inline float exact_at(const exact_tokens *ex, const void *base, int64_t index) {
    if (ex->dtype == 0) return ((const float *)base)[index];
    const uint32_t bits = (uint32_t)((const uint16_t *)base)[index] << 16; /* bfloat16: the top half of a float */
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static inline float dot(const float *a, const float *b, int n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* q . (exact token at offset), the token float32 or bfloat16. */
static inline float dot_exact(const float *q, const exact_tokens *ex, const void *base, int64_t offset, int dim) {
    if (ex->dtype == 0) return dot(q, (const float *)base + offset, dim);
    const uint16_t *half = (const uint16_t *)base + offset;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int d = 0; d < dim; d++) {
        const uint32_t bits = (uint32_t)half[d] << 16;
        float value;
        memcpy(&value, &bits, sizeof value);
        s += q[d] * value;
    }
    return s;
}

/* out += weight * (exact token at offset). */
static inline void add_exact(float *out, float weight, const exact_tokens *ex, const void *base, int64_t offset,
                             int dim) {
    for (int d = 0; d < dim; d++) out[d] += weight * exact_at(ex, base, offset + d);
}

/* A run of at most VEC compressed tokens [t0, t0 + n) scored with one projected query tile: q_latent
 * [GROUP_TILE, r_max] and q . c (q_bias [GROUP_TILE]). */
typedef struct {
    int64_t t0;
    int n;
    const float *q_latent, *q_bias;
} segment;

/* Scores of up to SEGMENTS runs of one (b, h), keys in latent space, for the queries g0 .. g0 + gn (gn <=
 * GROUP_TILE): every stored slot decoded once per run, then one multiply-add per query. */
#define SEGMENTS 4
/* Each per-query routine below takes the tile's query count GN as a constant (it is inlined into a switch over
 * 1..GROUP_TILE), so its loops unroll exactly and its accumulators live in registers. */
#define INLINE static inline __attribute__((always_inline))
/* One run's accumulators: one vector per query of the tile, named (GCC keeps an array of vectors indexed in a loop in
 * memory, and the loop then waits on stores and loads; named vectors stay in registers). */
#define RUN_ACC(i) vec_f acc##i##_0, acc##i##_1, acc##i##_2, acc##i##_3
#define RUN_INIT(i)                                                                                                    \
    acc##i##_0 = (vec_f){0} + seg[i].q_bias[0];                                                                       \
    acc##i##_1 = (vec_f){0} + (GN > 1 ? seg[i].q_bias[1] : 0.0f);                                                      \
    acc##i##_2 = (vec_f){0} + (GN > 2 ? seg[i].q_bias[2] : 0.0f);                                                      \
    acc##i##_3 = (vec_f){0} + (GN > 3 ? seg[i].q_bias[3] : 0.0f)
#define RUN_STEP(i, form)                                                                                              \
    do {                                                                                                               \
        const vec_f x = read_slot(&r, seg[i].t0, seg[i].n, form);                                                      \
        const float *w = seg[i].q_latent + j;                                                                          \
        acc##i##_0 += w[0] * x;                                                                                        \
        if (GN > 1) acc##i##_1 += w[r_max] * x;                                                                        \
        if (GN > 2) acc##i##_2 += w[2 * r_max] * x;                                                                    \
        if (GN > 3) acc##i##_3 += w[3 * r_max] * x;                                                                    \
    } while (0)
#define RUN_STEPS(form)                                                                                                \
    do {                                                                                                               \
        RUN_STEP(0, form); RUN_STEP(1, form); RUN_STEP(2, form); RUN_STEP(3, form);                                    \
    } while (0)
#define RUN_STORE(i)                                                                                                   \
    do {                                                                                                               \
        store_floats(rows[0] + seg[i].t0, acc##i##_0, seg[i].n);                                                       \
        if (GN > 1) store_floats(rows[1] + seg[i].t0, acc##i##_1, seg[i].n);                                           \
        if (GN > 2) store_floats(rows[2] + seg[i].t0, acc##i##_2, seg[i].n);                                           \
        if (GN > 3) store_floats(rows[3] + seg[i].t0, acc##i##_3, seg[i].n);                                           \
    } while (0)

INLINE void score_segments_n(const packed_kind *k, int b, int h, const segment *given, int count, const int GN,
                             float *const rows[GROUP_TILE]) {
    /* Always SEGMENTS (4) runs, those past count empty (masked loads of nothing, stores of nothing). */
    segment seg[SEGMENTS];
    for (int i = 0; i < SEGMENTS; i++) seg[i] = i < count ? given[i] : (segment){given[0].t0, 0, given[0].q_latent, given[0].q_bias};
    const int r_max = k->r_max;
    RUN_ACC(0); RUN_ACC(1); RUN_ACC(2); RUN_ACC(3);
    RUN_INIT(0); RUN_INIT(1); RUN_INIT(2); RUN_INIT(3);
    /* The next run's bytes of every column this head reads: each column is a separate stream the hardware
     * prefetcher does not follow, so without this every item waits on a cache miss per column. */
    const uint8_t *next = k->codes + (int64_t)b * k->batch_stride + given[count - 1].t0 + VEC;
    for (int j = 0; j < r_max; j++) {
        const int64_t s = (int64_t)h * r_max + j;
        if (k->mask_lo[s]) __builtin_prefetch(next + (int64_t)k->byte_lo[s] * k->column_stride);
        if (k->mask_hi[s]) __builtin_prefetch(next + (int64_t)k->byte_hi[s] * k->column_stride);
    }
    for (int j = 0; j < r_max; j++) {
        const int64_t s = (int64_t)h * r_max + j;
        if (!slot_used(k, s)) continue;
        const slot_reader r = slot_at(k, b, s);
        if (r.form == SLOT_LO) RUN_STEPS(SLOT_LO);
        else if (r.form == SLOT_LO_HI) RUN_STEPS(SLOT_LO_HI);
        else RUN_STEPS(SLOT_EXACT);
    }
    RUN_STORE(0); RUN_STORE(1); RUN_STORE(2); RUN_STORE(3);
}

static void score_segments(const packed_kind *k, int b, int h, const segment *seg, int count, int gn,
                           float *const rows[GROUP_TILE]) {
    switch (gn) {
    case 1: score_segments_n(k, b, h, seg, count, 1, rows); break;
    case 2: score_segments_n(k, b, h, seg, count, 2, rows); break;
    case 3: score_segments_n(k, b, h, seg, count, 3, rows); break;
    default: score_segments_n(k, b, h, seg, count, 4, rows); break;
    }
}

/* Scores of compressed tokens [t0, t0 + n) (n <= VEC), keys coded before RoPE: rebuilt, rotated, then scored
 * against the G queries q [G, D] of one (b, h). */
static void scores_rope(const packed_kind *k, const rope_tables *rope, int b, int h, int64_t t0, int n, int64_t tokens,
                        int dim, const float *q, int groups, float *row0, int64_t row_stride) {
    vec_f z[DIM_MAX], key[DIM_MAX];
    int used[DIM_MAX], count = 0;
    for (int j = 0; j < k->r_max; j++) {
        const int64_t s = (int64_t)h * k->r_max + j;
        if (!slot_used(k, s)) continue;
        const slot_reader r = slot_at(k, b, s);
        z[count] = r.form == SLOT_LO      ? read_slot(&r, t0, n, SLOT_LO)
                   : r.form == SLOT_LO_HI ? read_slot(&r, t0, n, SLOT_LO_HI)
                                          : read_slot(&r, t0, n, SLOT_EXACT);
        used[count++] = j;
    }
    const float *A = k->weight + (int64_t)h * k->r_max * dim, *c = k->bias + (int64_t)h * dim;
    for (int d0 = 0; d0 < dim; d0 += DIM_TILE) {
        vec_f acc[DIM_TILE];
        for (int i = 0; i < DIM_TILE; i++) acc[i] = (vec_f){0} + c[d0 + i];
        for (int j = 0; j < count; j++) {
            const float *w = A + (int64_t)used[j] * dim + d0;
            const vec_f zj = z[j];
            for (int i = 0; i < DIM_TILE; i++) acc[i] += w[i] * zj;
        }
        for (int i = 0; i < DIM_TILE; i++) key[d0 + i] = acc[i];
    }
    const int64_t row = rope->row_stride ? (int64_t)b * rope->row_stride : 0;
    for (int i = 0; i < rope->pairs; i++) {
        const vec_f ci = load_floats(rope->cos + row + (int64_t)i * tokens + t0, n);
        const vec_f si = load_floats(rope->sin + row + (int64_t)i * tokens + t0, n);
        const vec_f x = key[rope->first[i]], y = key[rope->second[i]];
        key[rope->first[i]] = x * ci - y * si;
        key[rope->second[i]] = y * ci + x * si;
    }
    for (int g = 0; g < groups; g++) {
        const float *qg = q + (int64_t)g * dim;
        vec_f score = {0};
        for (int d = 0; d < dim; d++) score += qg[d] * key[d];
        store_floats(row0 + g * row_stride + t0, score, n);
    }
}

/* The queries of one (b, h) split by rotary pair once per work item: qa / qb [GROUP_TILE][P] their pairs' first and
 * second channels (each block then turns them as whole vectors), the rest of q passing through (channels >= 2P);
 * and their dot with the bias c in the form each block's rotation enters it: q_rot . c = sum_i cos_i bu_i + sin_i
 * bv_i + rest, with bu_i = x_i c_f + y_i c_s, bv_i = y_i c_f - x_i c_s (x, y the pair's channels, c_f, c_s the
 * bias at them). */
typedef struct {
    float qa[GROUP_TILE][DIM_MAX / 2], qb[GROUP_TILE][DIM_MAX / 2];
    float bu[GROUP_TILE][DIM_MAX / 2], bv[GROUP_TILE][DIM_MAX / 2], rest[GROUP_TILE];
    const float *q;
} paired_queries;

INLINE void pair_queries(const rope_tables *rope, const float *q, const float *c, int dim, const int GN,
                         paired_queries *out) {
    for (int g = 0; g < GN; g++) {
        for (int i = 0; i < rope->pairs; i++) {
            const float x = q[(int64_t)g * dim + rope->first[i]], y = q[(int64_t)g * dim + rope->second[i]];
            const float cf = c[rope->first[i]], cs = c[rope->second[i]];
            out->qa[g][i] = x;
            out->qb[g][i] = y;
            out->bu[g][i] = x * cf + y * cs;
            out->bv[g][i] = y * cf - x * cs;
        }
        float rest = 0.0f;
        for (int d = 2 * rope->pairs; d < dim; d++) rest += q[(int64_t)g * dim + d] * c[d];
        out->rest[g] = rest;
    }
    out->q = q;
}

/* The queries rotated back by block entry e (the transpose of the keys' rotation, the tables' scale included),
 * projected into latent space (q_latent [GN, r_max]) and dotted with the bias (q_bias [GN]). Each pair's two rows
 * of A^T are loaded once and accumulated into every query's latent rows, held in registers (no reductions). */
INLINE void block_queries_n(const packed_kind *k, const rope_tables *rope, int b, int h, int64_t e, int dim,
                            const paired_queries *pq, const int GN, float *q_latent, float *q_bias) {
    const int64_t row = rope->row_stride ? (int64_t)b * rope->row_stride : 0;
    const float *ce = rope->cos + row + e * rope->pairs, *se = rope->sin + row + e * rope->pairs; /* entry-major */
    const int pairs = rope->pairs;
    const int r_pad = (k->r_max + PROJ_TILE - 1) / PROJ_TILE * PROJ_TILE;
    const float *At = k->weight_t + (int64_t)h * dim * r_pad;
    float tf[GROUP_TILE][DIM_MAX / 2], ts[GROUP_TILE][DIM_MAX / 2];
    for (int g = 0; g < GN; g++) {
        const float *restrict qa = pq->qa[g], *restrict qb = pq->qb[g], *restrict bu = pq->bu[g], *restrict bv = pq->bv[g];
        float *restrict tfg = tf[g], *restrict tsg = ts[g];
        float bias = pq->rest[g];
#pragma omp simd reduction(+ : bias)
        for (int i = 0; i < pairs; i++) {
            tfg[i] = qa[i] * ce[i] + qb[i] * se[i];
            tsg[i] = qb[i] * ce[i] - qa[i] * se[i];
            bias += ce[i] * bu[i] + se[i] * bv[i];
        }
        q_bias[g] = bias;
    }
    /* Each query's PROJ_TILE latent rows in four named vectors (registers: see RUN_ACC). */
#define PROJ_ACC(g) vec_f p##g##_0 = {0}, p##g##_1 = {0}, p##g##_2 = {0}, p##g##_3 = {0}
#define PROJ_PAIR(g)                                                                                                   \
    if (GN > g) {                                                                                                      \
        const float wf = tf[g][i], ws = ts[g][i];                                                                      \
        p##g##_0 += wf * f0;                                                                                       \
        p##g##_0 += ws * s0;                                                                                       \
        p##g##_1 += wf * f1;                                                                                       \
        p##g##_1 += ws * s1;                                                                                       \
        p##g##_2 += wf * f2;                                                                                       \
        p##g##_2 += ws * s2;                                                                                       \
        p##g##_3 += wf * f3;                                                                                       \
        p##g##_3 += ws * s3;                                                                                       \
    }
#define PROJ_REST(g)                                                                                                   \
    if (GN > g) {                                                                                                      \
        const float w = pq->q[(int64_t)g * dim + d];                                                                   \
        p##g##_0 += w * f0;                                                                                            \
        p##g##_1 += w * f1;                                                                                            \
        p##g##_2 += w * f2;                                                                                            \
        p##g##_3 += w * f3;                                                                                            \
    }
#define PROJ_STORE(g)                                                                                                  \
    if (GN > g) {                                                                                                      \
        float *dst = q_latent + g * k->r_max + j0;                                                                     \
        store_floats(dst, p##g##_0, keep < VEC ? keep : VEC);                                                          \
        if (keep > VEC) store_floats(dst + VEC, p##g##_1, keep - VEC < VEC ? keep - VEC : VEC);                        \
        if (keep > 2 * VEC) store_floats(dst + 2 * VEC, p##g##_2, keep - 2 * VEC < VEC ? keep - 2 * VEC : VEC);        \
        if (keep > 3 * VEC) store_floats(dst + 3 * VEC, p##g##_3, keep - 3 * VEC < VEC ? keep - 3 * VEC : VEC);        \
    }
    for (int j0 = 0; j0 < r_pad; j0 += PROJ_TILE) {
        PROJ_ACC(0); PROJ_ACC(1); PROJ_ACC(2); PROJ_ACC(3);
        for (int i = 0; i < pairs; i++) {
            const float *colf = At + (int64_t)rope->first[i] * r_pad + j0;
            const float *cols = At + (int64_t)rope->second[i] * r_pad + j0;
            const vec_f f0 = load_floats(colf, VEC), f1 = load_floats(colf + VEC, VEC);
            const vec_f f2 = load_floats(colf + 2 * VEC, VEC), f3 = load_floats(colf + 3 * VEC, VEC);
            const vec_f s0 = load_floats(cols, VEC), s1 = load_floats(cols + VEC, VEC);
            const vec_f s2 = load_floats(cols + 2 * VEC, VEC), s3 = load_floats(cols + 3 * VEC, VEC);
            PROJ_PAIR(0) PROJ_PAIR(1) PROJ_PAIR(2) PROJ_PAIR(3)
        }
        for (int d = 2 * pairs; d < dim; d++) { /* channels that do not rotate */
            const float *col = At + (int64_t)d * r_pad + j0;
            const vec_f f0 = load_floats(col, VEC), f1 = load_floats(col + VEC, VEC);
            const vec_f f2 = load_floats(col + 2 * VEC, VEC), f3 = load_floats(col + 3 * VEC, VEC);
            PROJ_REST(0) PROJ_REST(1) PROJ_REST(2) PROJ_REST(3)
        }
        const int keep = k->r_max - j0 < PROJ_TILE ? k->r_max - j0 : PROJ_TILE;
        PROJ_STORE(0) PROJ_STORE(1) PROJ_STORE(2) PROJ_STORE(3)
    }
}

/* Scores of a run of RoPE blocks [first, last) of one (b, h), for the queries g0 .. g0 + GN: the queries paired
 * once, rotated and projected once per block, then every block's tokens scored in latent space. */
INLINE void score_blocks_n(const packed_kind *k, const rope_tables *rope, int b, int h, int64_t first, int64_t last,
                           int64_t tokens, int dim, const float *q, const int GN, float *const rows[GROUP_TILE]) {
    paired_queries pq;
    pair_queries(rope, q, k->bias + (int64_t)h * dim, dim, GN, &pq);
    float block_latent[RUN_BLOCKS][GROUP_TILE * DIM_MAX], block_bias[RUN_BLOCKS][GROUP_TILE];
    segment seg[SEGMENTS];
    int count = 0;
    for (int64_t e = first; e < last; e++) {
        float *latent_e = block_latent[e - first], *bias_e = block_bias[e - first];
        block_queries_n(k, rope, b, h, e, dim, &pq, GN, latent_e, bias_e);
        int64_t start = e * rope->block - rope->lead, stop = start + rope->block;
        start = start < 0 ? 0 : start;
        stop = stop > tokens ? tokens : stop;
        for (int64_t t0 = start; t0 < stop; t0 += VEC) {
            seg[count++] = (segment){t0, (int)(stop - t0 < VEC ? stop - t0 : VEC), latent_e, bias_e};
            if (count == SEGMENTS) {
                score_segments_n(k, b, h, seg, count, GN, rows);
                count = 0;
            }
        }
    }
    if (count) score_segments_n(k, b, h, seg, count, GN, rows);
}

static void score_blocks(const packed_kind *k, const rope_tables *rope, int b, int h, int64_t first, int64_t last,
                         int64_t tokens, int dim, const float *q, int gn, float *const rows[GROUP_TILE]) {
    switch (gn) {
    case 1: score_blocks_n(k, rope, b, h, first, last, tokens, dim, q, 1, rows); break;
    case 2: score_blocks_n(k, rope, b, h, first, last, tokens, dim, q, 2, rows); break;
    case 3: score_blocks_n(k, rope, b, h, first, last, tokens, dim, q, 3, rows); break;
    default: score_blocks_n(k, rope, b, h, first, last, tokens, dim, q, 4, rows); break;
    }
}

static inline float hsum(vec_f x) {
#if defined(MASKED_IO)
    __m512 v;
    memcpy(&v, &x, sizeof v);
    return _mm512_reduce_add_ps(v);
#else
    float sum = 0.0f;
    for (int t = 0; t < VEC; t++) sum += x[t];
    return sum;
#endif
}

/* sum_t p[g][t] code_j(t) of one resolved slot over tokens [first_vec * VEC, last_vec * VEC), for the queries of a
 * tile (GN of them), into out[g * r_max]. Two token vectors per step, each query's two sums in named accumulators
 * (registers: see RUN_ACC), so the multiply-adds do not wait on each other's latency. */
INLINE void mix_slot_n(const slot_reader *r, const int form, int64_t first_vec, int64_t last_vec, int64_t tokens,
                       const float *const rows[GROUP_TILE], const int GN, float *out, int r_max) {
    const float *r0 = rows[0], *r1 = rows[GN > 1 ? 1 : 0], *r2 = rows[GN > 2 ? 2 : 0], *r3 = rows[GN > 3 ? 3 : 0];
    vec_f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0};
    int64_t i = first_vec;
    for (; i + 2 <= last_vec && (i + 2) * VEC <= tokens; i += 2) {
        const int64_t t0 = i * VEC, t1 = t0 + VEC;
        const vec_f c0 = read_slot(r, t0, VEC, form), c1 = read_slot(r, t1, VEC, form);
        a0 += load_floats(r0 + t0, VEC) * c0;
        b0 += load_floats(r0 + t1, VEC) * c1;
        if (GN > 1) a1 += load_floats(r1 + t0, VEC) * c0, b1 += load_floats(r1 + t1, VEC) * c1;
        if (GN > 2) a2 += load_floats(r2 + t0, VEC) * c0, b2 += load_floats(r2 + t1, VEC) * c1;
        if (GN > 3) a3 += load_floats(r3 + t0, VEC) * c0, b3 += load_floats(r3 + t1, VEC) * c1;
    }
    for (; i < last_vec; i++) {
        const int64_t t0 = i * VEC;
        const int n = (int)(tokens - t0 < VEC ? tokens - t0 : VEC);
        const vec_f c0 = read_slot(r, t0, n, form);
        a0 += load_floats(r0 + t0, n) * c0;
        if (GN > 1) a1 += load_floats(r1 + t0, n) * c0;
        if (GN > 2) a2 += load_floats(r2 + t0, n) * c0;
        if (GN > 3) a3 += load_floats(r3 + t0, n) * c0;
    }
    out[0] = hsum(a0 + b0);
    if (GN > 1) out[r_max] = hsum(a1 + b1);
    if (GN > 2) out[2 * r_max] = hsum(a2 + b2);
    if (GN > 3) out[3 * r_max] = hsum(a3 + b3);
}

/* sum_t p[g][t] code_j(t) over tokens [first_vec * VEC, last_vec * VEC) of one (b, h), every stored slot j, for the
 * queries g0 .. g0 + gn; into out [gn, r_max]. */
INLINE void mix_chunk_n(const packed_kind *v, int b, int h, int64_t first_vec, int64_t last_vec, int64_t tokens,
                        const float *const rows[GROUP_TILE], const int GN, float *out) {
    const int r_max = v->r_max;
    for (int j = 0; j < r_max; j++) {
        const int64_t s = (int64_t)h * r_max + j;
        if (!slot_used(v, s)) {
            for (int g = 0; g < GN; g++) out[g * r_max + j] = 0.0f;
            continue;
        }
        const slot_reader r = slot_at(v, b, s);
        switch (r.form) {
        case SLOT_LO: mix_slot_n(&r, SLOT_LO, first_vec, last_vec, tokens, rows, GN, out + j, r_max); break;
        case SLOT_LO_HI: mix_slot_n(&r, SLOT_LO_HI, first_vec, last_vec, tokens, rows, GN, out + j, r_max); break;
        default: mix_slot_n(&r, SLOT_EXACT, first_vec, last_vec, tokens, rows, GN, out + j, r_max); break;
        }
    }
}

static void mix_chunk(const packed_kind *v, int b, int h, int64_t first_vec, int64_t last_vec, int64_t tokens,
                      const float *const rows[GROUP_TILE], int gn, float *out) {
    switch (gn) {
    case 1: mix_chunk_n(v, b, h, first_vec, last_vec, tokens, rows, 1, out); break;
    case 2: mix_chunk_n(v, b, h, first_vec, last_vec, tokens, rows, 2, out); break;
    case 3: mix_chunk_n(v, b, h, first_vec, last_vec, tokens, rows, 3, out); break;
    default: mix_chunk_n(v, b, h, first_vec, last_vec, tokens, rows, 4, out); break;
    }
}

void kvl_attend(int batch, int heads, int groups, int dim, const float *q, const exact_tokens *sink,
                const exact_tokens *recent, const packed_kind *k, const rope_tables *rope, const packed_kind *v,
                int64_t tokens, const float *mask, int64_t mask_row_stride, float softcap, float *scratch, float *out,
                int threads) {
    /* scratch (kvlight.serving.kernels.scratch_floats): the rows, then the latent queries and biases, the compressed
     * share of each row's weights, and the values' partial sums of at most 2 * threads token chunks. */
    const int64_t rows = (int64_t)batch * heads * groups;
    const int64_t n_sink = sink->tokens, n_recent = recent->tokens, total = n_sink + tokens + n_recent;
    const int64_t front = n_sink + tokens;
    float *scores = scratch;                      /* [B, H, G, total] */
    float *q_latent = scores + rows * total;      /* [B, H, G, r_max_k] */
    float *q_bias = q_latent + rows * k->r_max;   /* [B, H, G] */
    float *p_sum = q_bias + rows;                 /* [B, H, G]: the compressed tokens' share of the weights */
    float *partial = p_sum + rows;                /* [chunks, B, H, G, r_max_v] */
    const int64_t pairs_bh = (int64_t)batch * heads;
    const int g_tiles = (groups + GROUP_TILE - 1) / GROUP_TILE;
    const int64_t vecs = (tokens + VEC - 1) / VEC;
    int64_t chunks = (2 * (int64_t)threads + pairs_bh - 1) / pairs_bh;
    if (chunks > 2 * (int64_t)threads) chunks = 2 * (int64_t)threads;
    if (chunks > vecs) chunks = vecs;
    if (chunks < 1) chunks = 1;
    const int64_t per_chunk = (vecs + chunks - 1) / chunks;
    const int latent = rope->pairs == 0, per_block = rope->pairs && rope->block > 1;
    /* RoPE blocks per work item: enough for about BLOCK tokens, at most RUN_BLOCKS. */
    int64_t per_item = per_block ? BLOCK / rope->block : 1;
    per_item = per_item < 1 ? 1 : per_item > RUN_BLOCKS ? RUN_BLOCKS : per_item;
    const int64_t blocks = latent      ? (tokens + BLOCK - 1) / BLOCK
                           : per_block ? (rope->entries + per_item - 1) / per_item
                                       : (tokens + VEC - 1) / VEC;
    const int tiled = latent || per_block; /* work items per query tile */

#pragma omp parallel num_threads(threads)
    {
        /* 1. Per query: the exact tokens' scores and, for keys in latent space, q A^T and q . c. */
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const int64_t bh = r / groups;
            const int h = (int)(bh % heads);
            const float *qr = q + r * dim;
            float *row = scores + r * total;
            for (int64_t t = 0; t < n_sink; t++) row[t] = dot_exact(qr, sink, sink->keys, (bh * n_sink + t) * dim, dim);
            for (int64_t t = 0; t < n_recent; t++)
                row[front + t] = dot_exact(qr, recent, recent->keys, (bh * n_recent + t) * dim, dim);
            if (latent && tokens) {
                const float *A = k->weight + (int64_t)h * k->r_max * dim;
                for (int j = 0; j < k->r_max; j++) q_latent[r * k->r_max + j] = dot(qr, A + (int64_t)j * dim, dim);
                q_bias[r] = dot(qr, k->bias + (int64_t)h * dim, dim);
            }
        }
        /* 2. The compressed tokens' scores, by token block. */
#pragma omp for schedule(static)
        for (int64_t w = 0; w < pairs_bh * blocks * (tiled ? g_tiles : 1); w++) {
            const int64_t block = w % blocks, rest = w / blocks;
            const int64_t bh = tiled ? rest / g_tiles : rest;
            const int b = (int)(bh / heads), h = (int)(bh % heads);
            if (per_block) { /* a run of RoPE blocks: the queries rotated and projected once per block */
                const int g0 = (int)(rest % g_tiles) * GROUP_TILE;
                const int gn = groups - g0 < GROUP_TILE ? groups - g0 : GROUP_TILE;
                float *row_of[GROUP_TILE];
                for (int g = 0; g < GROUP_TILE; g++) row_of[g] = scores + (bh * groups + g0 + (g < gn ? g : 0)) * total + n_sink;
                const int64_t first = block * per_item, last = first + per_item < rope->entries ? first + per_item : rope->entries;
                score_blocks(k, rope, b, h, first, last, tokens, dim, q + (bh * groups + g0) * dim, gn, row_of);
            } else if (latent) {
                const int g0 = (int)(rest % g_tiles) * GROUP_TILE;
                const int gn = groups - g0 < GROUP_TILE ? groups - g0 : GROUP_TILE;
                float *row_of[GROUP_TILE];
                for (int g = 0; g < GROUP_TILE; g++) row_of[g] = scores + (bh * groups + g0 + (g < gn ? g : 0)) * total + n_sink;
                const float *latent_q = q_latent + (bh * groups + g0) * k->r_max, *bias_q = q_bias + bh * groups + g0;
                segment seg[SEGMENTS];
                int count = 0;
                for (int64_t t0 = block * BLOCK; t0 < tokens && t0 < (block + 1) * BLOCK; t0 += VEC)
                    seg[count++] = (segment){t0, (int)(tokens - t0 < VEC ? tokens - t0 : VEC), latent_q, bias_q};
                score_segments(k, b, h, seg, count, gn, row_of);
            } else {
                const int64_t t0 = block * VEC;
                scores_rope(k, rope, b, h, t0, (int)(tokens - t0 < VEC ? tokens - t0 : VEC), tokens, dim,
                            q + bh * groups * dim, groups, scores + bh * groups * total + n_sink, total);
            }
        }
        /* 3. Softmax of every row, softcapped and masked as the model's attention does. */
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            float *row = scores + r * total;
            const float *add = mask ? mask + (r / (heads * groups)) * mask_row_stride : NULL;
            if (softcap > 0.0f)
                for (int64_t t = 0; t < total; t++) row[t] = tanhf(row[t] / softcap) * softcap;
            if (add)
                for (int64_t t = 0; t < total; t++) row[t] += add[t];
            float top = -INFINITY;
#pragma omp simd reduction(max : top)
            for (int64_t t = 0; t < total; t++) top = row[t] > top ? row[t] : top;
            if (top == -INFINITY) top = 0.0f; /* every token masked: weights 0 */
            vec_f sums = {0};
            int64_t t = 0;
            for (; t + VEC <= total; t += VEC) {
                vec_f x;
                memcpy(&x, row + t, sizeof x);
                x = exp_vec(x - top);
                memcpy(row + t, &x, sizeof x);
                sums += x;
            }
            if (t < total) {
                vec_f x = (vec_f){0} - INFINITY;
                for (int64_t i = t; i < total; i++) x[i - t] = row[i];
                x = exp_vec(x - top);
                for (int64_t i = t; i < total; i++) row[i] = x[i - t];
                sums += x;
            }
            float sum = 0.0f;
            for (int i = 0; i < VEC; i++) sum += sums[i];
            const float scale = sum > 0.0f ? 1.0f / sum : 0.0f;
            float compressed = 0.0f;
#pragma omp simd reduction(+ : compressed)
            for (int64_t i = 0; i < total; i++) {
                row[i] *= scale;
                compressed += (i >= n_sink && i < front) ? row[i] : 0.0f;
            }
            p_sum[r] = compressed;
        }
        /* 4. The compressed tokens' values, mixed in latent space by token chunk. */
#pragma omp for schedule(static)
        for (int64_t w = 0; w < pairs_bh * chunks * g_tiles; w++) {
            const int64_t chunk = w % chunks, rest = w / chunks;
            const int64_t bh = rest / g_tiles;
            const int g0 = (int)(rest % g_tiles) * GROUP_TILE;
            const int gn = groups - g0 < GROUP_TILE ? groups - g0 : GROUP_TILE;
            const int b = (int)(bh / heads), h = (int)(bh % heads);
            const int64_t first = chunk * per_chunk, last = first + per_chunk < vecs ? first + per_chunk : vecs;
            const float *row_of[GROUP_TILE];
            for (int g = 0; g < GROUP_TILE; g++) row_of[g] = scores + (bh * groups + g0 + (g < gn ? g : 0)) * total + n_sink;
            mix_chunk(v, b, h, first, last, tokens, row_of, gn, partial + (chunk * rows + bh * groups + g0) * v->r_max);
        }
        /* 5. Per query: the chunks added up and decoded once, plus the exact tokens' values. */
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            const int64_t bh = r / groups;
            const int h = (int)(bh % heads);
            const float *row = scores + r * total;
            float *o = out + r * dim;
            for (int d = 0; d < dim; d++) o[d] = 0.0f;
            if (tokens) {
                const float *A = v->weight + (int64_t)h * v->r_max * dim, *c = v->bias + (int64_t)h * dim;
                for (int j = 0; j < v->r_max; j++) {
                    float mixed = 0.0f;
                    for (int64_t chunk = 0; chunk < chunks; chunk++) mixed += partial[(chunk * rows + r) * v->r_max + j];
                    if (mixed != 0.0f)
                        for (int d = 0; d < dim; d++) o[d] += mixed * A[(int64_t)j * dim + d];
                }
                for (int d = 0; d < dim; d++) o[d] += p_sum[r] * c[d];
            }
            for (int64_t t = 0; t < n_sink; t++) add_exact(o, row[t], sink, sink->values, (bh * n_sink + t) * dim, dim);
            for (int64_t t = 0; t < n_recent; t++)
                add_exact(o, row[front + t], recent, recent->values, (bh * n_recent + t) * dim, dim);
        }
    }
}

/* The OpenMP runtime this library runs on reports its thread limit (a test checks it is torch's). */
int kvl_max_threads(void) { return omp_get_max_threads(); }
