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
#define MIX_LANES 4         /* independent accumulators per query while mixing values */

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

/* VEC bytes (floats) from src; only the first n (zeros after) at the end of a row. */
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

/* The codes of slot s for the n <= VEC tokens from t0 of batch row b, as floats (0 past n). */
static vec_f exact_slot(const packed_kind *kind, int b, int64_t column, int64_t t0, int n) {
    const int64_t offset = (int64_t)b * kind->exact_batch_stride + column * kind->exact_col_stride + t0;
    if (kind->exact_dtype == 0) return load_floats((const float *)kind->exact + offset, n);
    const uint16_t *half = (const uint16_t *)kind->exact + offset;
    vec_i bits = {0};
    for (int t = 0; t < n; t++) bits[t] = (int32_t)((uint32_t)half[t] << 16); /* bfloat16: a float's top half */
    vec_f out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

static inline vec_f decode_slot(const packed_kind *kind, int b, int64_t s, int64_t t0, int n) {
    if (__builtin_expect(kind->exact_col[s] >= 0, 0)) return exact_slot(kind, b, kind->exact_col[s], t0, n);
    const uint8_t *base = kind->codes + (int64_t)b * kind->batch_stride + t0;
    vec_i x = widen(load_bytes(base + (int64_t)kind->byte_lo[s] * kind->column_stride, n));
    x = (x >> (int32_t)kind->bit_lo[s]) & (int32_t)kind->mask_lo[s];
    if (kind->mask_hi[s]) {
        vec_i y = widen(load_bytes(base + (int64_t)kind->byte_hi[s] * kind->column_stride, n));
        x |= ((y >> (int32_t)kind->bit_hi[s]) & (int32_t)kind->mask_hi[s]) << (int32_t)kind->shift_hi[s];
    }
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
INLINE void score_segments_n(const packed_kind *k, int b, int h, const segment *seg, int count, const int GN,
                             float *const rows[GROUP_TILE]) {
    vec_f acc[SEGMENTS][GROUP_TILE];
    for (int i = 0; i < SEGMENTS; i++)
        for (int g = 0; g < GN; g++) acc[i][g] = (vec_f){0} + (i < count ? seg[i].q_bias[g] : 0.0f);
    /* The next run's bytes of every column this head reads: each column is a separate stream the hardware
     * prefetcher does not follow, so without this every item waits on a cache miss per column. */
    const uint8_t *next = k->codes + (int64_t)b * k->batch_stride + seg[count - 1].t0 + VEC;
    for (int j = 0; j < k->r_max; j++) {
        const int64_t s = (int64_t)h * k->r_max + j;
        if (k->mask_lo[s]) __builtin_prefetch(next + (int64_t)k->byte_lo[s] * k->column_stride);
        if (k->mask_hi[s]) __builtin_prefetch(next + (int64_t)k->byte_hi[s] * k->column_stride);
    }
    for (int j = 0; j < k->r_max; j++) {
        const int64_t s = (int64_t)h * k->r_max + j;
        if (!slot_used(k, s)) continue;
        for (int i = 0; i < SEGMENTS; i++) {
            if (i >= count) break;
            const vec_f v = decode_slot(k, b, s, seg[i].t0, seg[i].n);
            const float *weight = seg[i].q_latent + j;
            for (int g = 0; g < GN; g++) acc[i][g] += weight[g * k->r_max] * v;
        }
    }
    for (int i = 0; i < count; i++)
        for (int g = 0; g < GN; g++) memcpy(rows[g] + seg[i].t0, &acc[i][g], sizeof(float) * (size_t)seg[i].n);
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
        z[count] = decode_slot(k, b, s, t0, n);
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
        memcpy(row0 + g * row_stride + t0, &score, sizeof(float) * (size_t)n);
    }
}

/* The queries of one (b, h) split by rotary pair once per work item: qa / qb [GROUP_TILE][P] their pairs' first and
 * second channels (each block then turns them as whole vectors), the rest of q passing through (channels >= 2P). */
typedef struct {
    float qa[GROUP_TILE][DIM_MAX / 2], qb[GROUP_TILE][DIM_MAX / 2];
    const float *q;
} paired_queries;

INLINE void pair_queries(const rope_tables *rope, const float *q, int dim, const int GN, paired_queries *out) {
    for (int g = 0; g < GN; g++)
        for (int i = 0; i < rope->pairs; i++) {
            out->qa[g][i] = q[(int64_t)g * dim + rope->first[i]];
            out->qb[g][i] = q[(int64_t)g * dim + rope->second[i]];
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
    const float *At = k->weight_t + (int64_t)h * dim * r_pad, *c = k->bias + (int64_t)h * dim;
    float tf[GROUP_TILE][DIM_MAX / 2], ts[GROUP_TILE][DIM_MAX / 2];
    for (int g = 0; g < GN; g++) {
        float bias = 0.0f;
        for (int i = 0; i < pairs; i++) {
            const float x = pq->qa[g][i], y = pq->qb[g][i];
            tf[g][i] = x * ce[i] + y * se[i];
            ts[g][i] = y * ce[i] - x * se[i];
        }
        for (int i = 0; i < pairs; i++) bias += tf[g][i] * c[rope->first[i]] + ts[g][i] * c[rope->second[i]];
        for (int d = 2 * pairs; d < dim; d++) bias += pq->q[(int64_t)g * dim + d] * c[d];
        q_bias[g] = bias;
    }
    for (int j0 = 0; j0 < r_pad; j0 += PROJ_TILE) {
        vec_f acc[GROUP_TILE][PROJ_TILE / VEC];
        for (int g = 0; g < GN; g++)
            for (int v = 0; v < PROJ_TILE / VEC; v++) acc[g][v] = (vec_f){0};
        for (int i = 0; i < pairs; i++) {
            const float *colf = At + (int64_t)rope->first[i] * r_pad + j0;
            const float *cols = At + (int64_t)rope->second[i] * r_pad + j0;
            vec_f f[PROJ_TILE / VEC], sc[PROJ_TILE / VEC];
            for (int v = 0; v < PROJ_TILE / VEC; v++) f[v] = load_floats(colf + v * VEC, VEC);
            for (int v = 0; v < PROJ_TILE / VEC; v++) sc[v] = load_floats(cols + v * VEC, VEC);
            for (int g = 0; g < GN; g++) {
                const float wf = tf[g][i], ws = ts[g][i];
                for (int v = 0; v < PROJ_TILE / VEC; v++) acc[g][v] += wf * f[v] + ws * sc[v];
            }
        }
        for (int d = 2 * pairs; d < dim; d++) { /* channels that do not rotate */
            vec_f col[PROJ_TILE / VEC];
            for (int v = 0; v < PROJ_TILE / VEC; v++) col[v] = load_floats(At + (int64_t)d * r_pad + j0 + v * VEC, VEC);
            for (int g = 0; g < GN; g++) {
                const float w = pq->q[(int64_t)g * dim + d];
                for (int v = 0; v < PROJ_TILE / VEC; v++) acc[g][v] += w * col[v];
            }
        }
        const int keep = k->r_max - j0 < PROJ_TILE ? k->r_max - j0 : PROJ_TILE;
        for (int g = 0; g < GN; g++) memcpy(q_latent + g * k->r_max + j0, acc[g], sizeof(float) * (size_t)keep);
    }
}

/* Scores of a run of RoPE blocks [first, last) of one (b, h), for the queries g0 .. g0 + GN: the queries paired
 * once, rotated and projected once per block, then every block's tokens scored in latent space. */
INLINE void score_blocks_n(const packed_kind *k, const rope_tables *rope, int b, int h, int64_t first, int64_t last,
                           int64_t tokens, int dim, const float *q, const int GN, float *const rows[GROUP_TILE]) {
    paired_queries pq;
    pair_queries(rope, q, dim, GN, &pq);
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

/* sum_t p[g][t] code_j(t) over tokens [first_vec * VEC, last_vec * VEC) of one (b, h), every stored slot j, for the
 * queries g0 .. g0 + gn; into out [gn, r_max]. */
INLINE void mix_chunk_n(const packed_kind *v, int b, int h, int64_t first_vec, int64_t last_vec, int64_t tokens,
                        const float *const rows[GROUP_TILE], const int GN, float *out) {
    for (int j = 0; j < v->r_max; j++) {
        const int64_t s = (int64_t)h * v->r_max + j;
        /* MIX_LANES independent accumulators per query (vectors i, i+1, ... of the chunk), so the multiply-adds do
         * not wait on each other's latency; added up at the end. */
        vec_f acc[MIX_LANES][GROUP_TILE];
        for (int u = 0; u < MIX_LANES; u++)
            for (int g = 0; g < GN; g++) acc[u][g] = (vec_f){0};
        if (slot_used(v, s)) {
            int64_t i = first_vec;
            for (; i + MIX_LANES <= last_vec && (i + MIX_LANES) * VEC <= tokens; i += MIX_LANES)
                for (int u = 0; u < MIX_LANES; u++) {
                    const int64_t t0 = (i + u) * VEC;
                    const vec_f code = decode_slot(v, b, s, t0, VEC);
                    for (int g = 0; g < GN; g++) acc[u][g] += load_floats(rows[g] + t0, VEC) * code;
                }
            for (; i < last_vec; i++) {
                const int64_t t0 = i * VEC;
                const int n = (int)(tokens - t0 < VEC ? tokens - t0 : VEC);
                const vec_f code = decode_slot(v, b, s, t0, n);
                for (int g = 0; g < GN; g++) acc[0][g] += load_floats(rows[g] + t0, n) * code;
            }
        }
        for (int g = 0; g < GN; g++) {
            vec_f total = acc[0][g];
            for (int u = 1; u < MIX_LANES; u++) total += acc[u][g];
            float sum = 0.0f;
            for (int t = 0; t < VEC; t++) sum += total[t];
            out[g * v->r_max + j] = sum;
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
