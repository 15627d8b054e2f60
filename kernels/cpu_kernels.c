/* CPU kernels of mlpot (backend "cpu"), built on first use by mlpot.kernels.cpu and called through
 * ctypes. Plain C99 with GCC/Clang vector extensions: one vector holds LANES consecutive channels,
 * so every operation below is LANES channels at once, whatever SIMD width the machine has.
 *
 * Symmetric contraction (MACE product basis) at inference, see mlpot.kernels.symmetric_contraction_cpu:
 * per node n of local species s and per block of LANES channels, the monomials of the node's
 * features x[n, :, c] (D components), m[0] = 1, m[1 + i] = x_i, m[q] = m[par[q]] * m[last[q]]
 * for q > D, then
 *   forward:  out[n, k, c] += F[s, e, c] * m[q_e] * x_{i_e}          over the entries e of F (row k_e)
 *   vjp:      gx[n, i, c]  += J[s, e, c] * m[q_e] * g[n, k_e, c]     over the entries e of J (row i_e)
 * Channels are the innermost (contiguous) axis of every array, with row stride ldc (a multiple of
 * LANES; padded channels hold zeros). The entries come sorted by monomial so that consecutive
 * updates go to different accumulators (no serial dependence between them).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16

typedef float vec_f32 __attribute__((vector_size(LANES * sizeof(float))));
typedef double vec_f64 __attribute__((vector_size(LANES * sizeof(double))));

int mlpot_cpu_lanes(void) { return LANES; }

#define SC_KERNELS(SUF, T, VT)                                                                       \
static inline VT load_##SUF(const T *p) { VT r; memcpy(&r, p, sizeof r); return r; }                 \
static inline void store_##SUF(T *p, VT v) { memcpy(p, &v, sizeof v); }                              \
                                                                                                     \
static void monomials_##SUF(VT *m, const T *xn, int64_t ldc, int64_t D, int64_t Q,                   \
                            const int32_t *par, const int32_t *last) {                               \
    VT one = {0};                                                                                    \
    one += 1;                                                                                        \
    m[0] = one;                                                                                      \
    for (int64_t i = 0; i < D; ++i) m[1 + i] = load_##SUF(xn + i * ldc);                             \
    for (int64_t q = 1 + D; q < Q; ++q) m[q] = m[par[q]] * m[last[q]];                               \
}                                                                                                    \
                                                                                                     \
int mlpot_sc_forward_##SUF(int64_t N, int64_t ldc, int64_t D, int64_t Q, int64_t K,                  \
                           const T *x, const int64_t *species, const int32_t *par,                   \
                           const int32_t *last, int64_t nE, const int32_t *ek, const int32_t *ei,    \
                           const int32_t *eq, const T *tab, T *out, int64_t c0, int64_t c1) {        \
    VT *m = aligned_alloc(sizeof(VT), sizeof(VT) * (size_t)(Q + K));                                 \
    if (!m) return 1;                                                                                \
    VT *acc = m + Q;                                                                                 \
    for (int64_t cb = c0; cb < c1; cb += LANES) {                                                    \
        for (int64_t n = 0; n < N; ++n) {                                                            \
            monomials_##SUF(m, x + n * D * ldc + cb, ldc, D, Q, par, last);                          \
            for (int64_t k = 0; k < K; ++k) acc[k] = m[0] - m[0];                                    \
            const T *t = tab + species[n] * nE * ldc + cb;                                           \
            for (int64_t e = 0; e < nE; ++e)                                                         \
                acc[ek[e]] += load_##SUF(t + e * ldc) * m[eq[e]] * m[1 + ei[e]];                     \
            T *o = out + n * K * ldc + cb;                                                           \
            for (int64_t k = 0; k < K; ++k) store_##SUF(o + k * ldc, acc[k]);                        \
        }                                                                                            \
    }                                                                                                \
    free(m);                                                                                         \
    return 0;                                                                                        \
}                                                                                                    \
                                                                                                     \
int mlpot_sc_vjp_##SUF(int64_t N, int64_t ldc, int64_t D, int64_t Q, int64_t K,                      \
                       const T *x, const int64_t *species, const int32_t *par, const int32_t *last,  \
                       int64_t nE, const int32_t *ek, const int32_t *ei, const int32_t *eq,          \
                       const T *tab, const T *g, T *gx, int64_t c0, int64_t c1) {                    \
    VT *m = aligned_alloc(sizeof(VT), sizeof(VT) * (size_t)(Q + K + D));                             \
    if (!m) return 1;                                                                                \
    VT *gk = m + Q, *acc = gk + K;                                                                   \
    for (int64_t cb = c0; cb < c1; cb += LANES) {                                                    \
        for (int64_t n = 0; n < N; ++n) {                                                            \
            monomials_##SUF(m, x + n * D * ldc + cb, ldc, D, Q, par, last);                          \
            const T *gn = g + n * K * ldc + cb;                                                      \
            for (int64_t k = 0; k < K; ++k) gk[k] = load_##SUF(gn + k * ldc);                        \
            for (int64_t i = 0; i < D; ++i) acc[i] = m[0] - m[0];                                    \
            const T *t = tab + species[n] * nE * ldc + cb;                                           \
            for (int64_t e = 0; e < nE; ++e)                                                         \
                acc[ei[e]] += load_##SUF(t + e * ldc) * m[eq[e]] * gk[ek[e]];                        \
            T *o = gx + n * D * ldc + cb;                                                            \
            for (int64_t i = 0; i < D; ++i) store_##SUF(o + i * ldc, acc[i]);                        \
        }                                                                                            \
    }                                                                                                \
    free(m);                                                                                         \
    return 0;                                                                                        \
}

SC_KERNELS(f32, float, vec_f32)
SC_KERNELS(f64, double, vec_f64)
