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
    m[0] = (VT){0} + 1;                                                                              \
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
            for (int64_t k = 0; k < K; ++k) acc[k] = (VT){0};                                    \
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
            for (int64_t i = 0; i < D; ++i) acc[i] = (VT){0};                                    \
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

/* Channelwise (uvu) message passing at inference, see mlpot.kernels.channelwise_tp_cpu: for the
 * edges e0:e1, sender s, receiver r, per path (output rows k0:k0+d, input rows a0:a0+A, weight
 * column p, entries off:off+d*A of the edge matrix M_e, row-major (k, a)):
 *   forward:  out[r, k0 + k] += sum_a M_e[off + k A + a] * x[s, a0 + a] * w[e, p]
 *   backward: t_a = sum_k M_e[off + k A + a] * g[r, k0 + k];   gx[s, a0 + a] += t_a * w[e, p];
 *             gw[e, p] = sum_a t_a * x[s, a0 + a];   gM[e, off + k A + a] = sum_c g[r, k0 + k] x[s, a0 + a] w[e, p]
 * x (N, A_tot, ldc), w and gw (E, P, ldc), out and g (N, K, ldc), M and gM (E, M_tot). The
 * caller gives each thread its own out / gx (scatter targets) and a disjoint edge range.
 */
#define CW_KERNELS(SUF, T, VT)                                                                       \
int mlpot_cw_forward_##SUF(int64_t ldc, int64_t Atot, int64_t K, int64_t P, int64_t Mtot,            \
                           const T *x, const T *M, const T *w, const int64_t *sender,                \
                           const int64_t *receiver, int64_t npaths, const int32_t *path,             \
                           T *out, int64_t e0, int64_t e1) {                                         \
    VT *xw = aligned_alloc(sizeof(VT), sizeof(VT) * (size_t)(Atot + 1));                             \
    if (!xw) return 1;                                                                               \
    for (int64_t e = e0; e < e1; ++e) {                                                              \
        const T *xs = x + sender[e] * Atot * ldc, *we = w + e * P * ldc, *Me = M + e * Mtot;          \
        T *orow = out + receiver[e] * K * ldc;                                                       \
        for (int64_t cb = 0; cb < ldc; cb += LANES) {                                                \
            for (int64_t j = 0; j < npaths; ++j) {                                                   \
                const int32_t *pj = path + 6 * j; /* p, k0, d, a0, A, off */                          \
                int32_t k0 = pj[1], d = pj[2], a0 = pj[3], A = pj[4], off = pj[5];                   \
                VT wp = load_##SUF(we + pj[0] * ldc + cb);                                           \
                for (int32_t a = 0; a < A; ++a) xw[a] = load_##SUF(xs + (a0 + a) * ldc + cb) * wp;    \
                for (int32_t k = 0; k < d; ++k) {                                                    \
                    const T *mk = Me + off + k * A;                                                  \
                    VT acc = xw[0] * mk[0];                                                          \
                    for (int32_t a = 1; a < A; ++a) acc += xw[a] * mk[a];                            \
                    T *o = orow + (k0 + k) * ldc + cb;                                               \
                    store_##SUF(o, load_##SUF(o) + acc);                                             \
                }                                                                                    \
            }                                                                                        \
        }                                                                                            \
    }                                                                                                \
    free(xw);                                                                                        \
    return 0;                                                                                        \
}                                                                                                    \
                                                                                                     \
int mlpot_cw_backward_##SUF(int64_t ldc, int64_t Atot, int64_t K, int64_t P, int64_t Mtot,           \
                            const T *x, const T *M, const T *w, const int64_t *sender,               \
                            const int64_t *receiver, int64_t npaths, const int32_t *path,            \
                            const T *g, T *gx, T *gM, T *gw, int64_t e0, int64_t e1) {               \
    VT *gk = aligned_alloc(sizeof(VT), sizeof(VT) * (size_t)(K + Mtot + 1));                         \
    if (!gk) return 1;                                                                               \
    VT *gm = gk + K;                                                                                 \
    for (int64_t e = e0; e < e1; ++e) {                                                              \
        const int64_t s = sender[e];                                                                 \
        const T *xs = x + s * Atot * ldc, *we = w + e * P * ldc, *Me = M + e * Mtot;                  \
        const T *gr = g + receiver[e] * K * ldc;                                                     \
        for (int64_t j = 0; j < Mtot; ++j) gm[j] = (VT){0};                                    \
        for (int64_t cb = 0; cb < ldc; cb += LANES) {                                                \
            for (int64_t j = 0; j < npaths; ++j) {                                                   \
                const int32_t *pj = path + 6 * j;                                                    \
                int32_t p = pj[0], k0 = pj[1], d = pj[2], a0 = pj[3], A = pj[4], off = pj[5];        \
                VT wp = load_##SUF(we + p * ldc + cb);                                               \
                for (int32_t k = 0; k < d; ++k) gk[k] = load_##SUF(gr + (k0 + k) * ldc + cb);        \
                VT gwp = (VT){0};                                                                    \
                for (int32_t a = 0; a < A; ++a) {                                                    \
                    VT xa = load_##SUF(xs + (a0 + a) * ldc + cb);                                    \
                    VT t = gk[0] * Me[off + a];                                                      \
                    for (int32_t k = 1; k < d; ++k) t += gk[k] * Me[off + k * A + a];                \
                    if (gx) {                                                                        \
                        T *o = gx + (s * Atot + a0 + a) * ldc + cb;                                  \
                        store_##SUF(o, load_##SUF(o) + t * wp);                                      \
                    }                                                                                \
                    gwp += t * xa;                                                                   \
                    if (gM) {                                                                        \
                        VT xw = xa * wp;                                                             \
                        for (int32_t k = 0; k < d; ++k) gm[off + k * A + a] += gk[k] * xw;           \
                    }                                                                                \
                }                                                                                    \
                if (gw) store_##SUF(gw + (e * P + p) * ldc + cb, gwp);                               \
            }                                                                                        \
        }                                                                                            \
        if (gM)                                                                                      \
            for (int64_t j = 0; j < Mtot; ++j) {                                                     \
                T sum = 0;                                                                           \
                for (int v = 0; v < LANES; ++v) sum += gm[j][v];                                     \
                gM[e * Mtot + j] = sum;                                                              \
            }                                                                                        \
    }                                                                                                \
    free(gk);                                                                                        \
    return 0;                                                                                        \
}

CW_KERNELS(f32, float, vec_f32)
CW_KERNELS(f64, double, vec_f64)
