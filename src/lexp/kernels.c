/* Fused kernels for the probes' training step (lexp.kernels builds and loads this file).
 *
 * Why: a step of the layer step's probes is two matrix products per block plus a dozen passes
 * over the 640K weights and the (heads x classes x rows) outputs. Those passes are memory-bound
 * on a CPU; here each is one pass. lexp.probes computes the same with torch operations when this
 * library is unavailable, and the tests check both give the same numbers.
 *
 * Threads: OpenMP. Loaded after torch, the library shares torch's OpenMP runtime, so
 * torch.set_num_threads applies and no second pool competes for the cores. Every reduction is
 * split into work items independent of the thread count and summed in a fixed order afterwards:
 * results do not depend on the number of threads.
 *
 * Two translation units' worth of flags: LEXP_FAST_MATH is defined when this file is compiled with
 * -ffast-math for the softmax kernel (vectorised expf); the Adam kernel is compiled without it.
 */
#include <math.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef LEXP_FAST_MATH

/* The number of threads the kernels use: torch's, when the OpenMP runtime is shared. */
int lexp_kernel_threads(void)
{
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

/* Adam on loss + ElasticNet penalty, over chunks of the flat weight; chunk c belongs to head
 * chunk_head[c] and never straddles two heads' segments. grad holds the data gradient; the
 * penalty's subgradient l1*sign(w) + l2*w/||W_h||_2 is added here, with ||W_h||_2 = head_norm[h]
 * (of the weights before this step; a zero norm gives a zero subgradient). The update is torch's
 * Adam (lerp for the first moment, sqrt(v)/sqrt(bias_correction2) + eps). Afterwards the new
 * weights' sum |w| and ||W_h||_2 per head go to out_abs / out_norm: the next step's penalty
 * without another pass. chunk_scratch: 2 * (n_chunks + n_heads) doubles. w_low: NULL, or a
 * bfloat16 copy of w to refresh. */
/* One chunk's update; STORE_LOW also writes the new weight rounded to bfloat16 (to nearest even)
 * into w_low, the copy the bfloat16 products read. */
#define LEXP_ADAM_CHUNK(STORE_LOW)                                                              \
    _Pragma("omp simd reduction(+ : a, q)") for (int64_t i = 0; i < len; i++)                  \
    {                                                                                           \
        float wi = wc[i];                                                                       \
        const float sign = (float)(wi > 0.0f) - (float)(wi < 0.0f);                             \
        const float g = gc[i] + l1 * sign + s * wi;                                             \
        const float mi = mc[i] + one_minus_beta1 * (g - mc[i]);                                 \
        const float vi = beta2 * vc[i] + one_minus_beta2 * g * g;                               \
        mc[i] = mi;                                                                             \
        vc[i] = vi;                                                                             \
        wi = wi - step_size * mi / (sqrtf(vi) / bc2_sqrt + eps);                                \
        wc[i] = wi;                                                                             \
        a += fabsf(wi);                                                                         \
        q += wi * wi;                                                                           \
        if (STORE_LOW) {                                                                        \
            union { float f; uint32_t u; } bits = {wi};                                         \
            lc[i] = (uint16_t)((bits.u + 0x7FFFu + ((bits.u >> 16) & 1u)) >> 16);               \
        }                                                                                       \
    }

void lexp_adam_elasticnet(float *w, const float *grad, float *m, float *v, int64_t n_chunks,
                          const int64_t *chunk_start, const int64_t *chunk_len,
                          const int64_t *chunk_head, int64_t n_heads, const float *head_norm,
                          float l1, float l2, float step_size, float beta1, float beta2,
                          float bc2_sqrt, float eps, double *chunk_scratch, float *out_abs,
                          float *out_norm, uint16_t *w_low)
{
    const float one_minus_beta1 = 1.0f - beta1, one_minus_beta2 = 1.0f - beta2;
#pragma omp parallel for schedule(static)
    for (int64_t c = 0; c < n_chunks; c++) {
        float *wc = w + chunk_start[c];
        const float *gc = grad + chunk_start[c];
        float *mc = m + chunk_start[c];
        float *vc = v + chunk_start[c];
        uint16_t *lc = w_low ? w_low + chunk_start[c] : 0;
        const float norm = head_norm[chunk_head[c]];
        const float s = (l2 > 0.0f && norm > 0.0f) ? l2 / norm : 0.0f;
        const int64_t len = chunk_len[c];
        float a = 0.0f, q = 0.0f;
        if (lc) {
            LEXP_ADAM_CHUNK(1)
        } else {
            LEXP_ADAM_CHUNK(0)
        }
        chunk_scratch[2 * c] = a;
        chunk_scratch[2 * c + 1] = q;
    }
    /* per head, in chunk order, in double */
    double *head_abs = chunk_scratch + 2 * n_chunks, *head_sq = head_abs + n_heads;
    for (int64_t h = 0; h < n_heads; h++)
        head_abs[h] = head_sq[h] = 0.0;
    for (int64_t c = 0; c < n_chunks; c++) {
        head_abs[chunk_head[c]] += chunk_scratch[2 * c];
        head_sq[chunk_head[c]] += chunk_scratch[2 * c + 1];
    }
    for (int64_t h = 0; h < n_heads; h++) {
        out_abs[h] = (float)head_abs[h];
        out_norm[h] = (float)sqrt(head_sq[h]);
    }
}

#else

#define LEXP_COLS 32 /* rows of the minibatch per work item */

/* Cross-entropy of H classification heads and its gradient, from the stacked block products.
 *
 * P (R, n): row-major products of every block, R = sum over blocks of (heads reading it) * K.
 * Head h reads the K-row slots starting at rows slot_row[head_ptr[h] .. head_ptr[h+1]); its logits
 * are z_h = bias_h + the sum of its slots. y (n): class ids in [0, K).
 * Out: D (R, n) holds, in every slot of head h, (softmax(z_h) - onehot(y)) / n — the gradient of
 * the mean cross-entropy w.r.t. that slot's products; loss (H) the mean cross-entropy;
 * bias_grad (H*K) the gradient of the bias. scratch: H * ceil(n/32) * (K+1) floats.
 */
void lexp_xent_heads(const float *P, const float *bias, const int64_t *y, int64_t H, int64_t K,
                     int64_t n, const int64_t *head_ptr, const int64_t *slot_row, float *D,
                     float *loss, float *bias_grad, float *scratch)
{
    const int64_t nblk = (n + LEXP_COLS - 1) / LEXP_COLS;
    const float inv_n = 1.0f / (float)n;
#pragma omp parallel for schedule(static)
    for (int64_t item = 0; item < H * nblk; item++) {
        const int64_t h = item / nblk, b0 = (item % nblk) * LEXP_COLS;
        const int64_t nb = (n - b0 < LEXP_COLS) ? n - b0 : LEXP_COLS;
        const int64_t s0 = head_ptr[h], s1 = head_ptr[h + 1];
        float *Z = D + slot_row[s0] * n + b0; /* the first slot holds z, then the gradient */
        float mx[LEXP_COLS], se[LEXP_COLS], zt[LEXP_COLS];
        float *part = scratch + item * (K + 1);
        for (int64_t b = 0; b < nb; b++)
            mx[b] = -INFINITY;
        for (int64_t k = 0; k < K; k++) {
            float *zr = Z + k * n;
            const float bk = bias[h * K + k];
            for (int64_t b = 0; b < nb; b++)
                zr[b] = bk;
            for (int64_t s = s0; s < s1; s++) {
                const float *pr = P + (slot_row[s] + k) * n + b0;
                for (int64_t b = 0; b < nb; b++)
                    zr[b] += pr[b];
            }
            for (int64_t b = 0; b < nb; b++)
                mx[b] = fmaxf(mx[b], zr[b]);
        }
        for (int64_t b = 0; b < nb; b++) {
            se[b] = 0.0f;
            zt[b] = Z[y[b0 + b] * n + b];
        }
        for (int64_t k = 0; k < K; k++) {
            float *zr = Z + k * n;
            for (int64_t b = 0; b < nb; b++) {
                const float e = expf(zr[b] - mx[b]);
                zr[b] = e;
                se[b] += e;
            }
        }
        float lsum = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            lsum += logf(se[b]) + mx[b] - zt[b];
            se[b] = inv_n / se[b];
        }
        for (int64_t k = 0; k < K; k++) {
            float *zr = Z + k * n;
            float acc = 0.0f;
            for (int64_t b = 0; b < nb; b++) {
                const float g = zr[b] * se[b];
                zr[b] = g;
                acc += g;
            }
            part[k] = acc;
        }
        for (int64_t b = 0; b < nb; b++) {
            Z[y[b0 + b] * n + b] -= inv_n;
            part[y[b0 + b]] -= inv_n;
        }
        part[K] = lsum;
        for (int64_t s = s0 + 1; s < s1; s++) {
            float *out = D + slot_row[s] * n + b0;
            for (int64_t k = 0; k < K; k++)
                for (int64_t b = 0; b < nb; b++)
                    out[k * n + b] = Z[k * n + b];
        }
    }
    /* the sums over the minibatch, in a fixed order */
    for (int64_t h = 0; h < H; h++) {
        const float *first = scratch + h * nblk * (K + 1);
        for (int64_t k = 0; k <= K; k++) {
            float acc = 0.0f;
            for (int64_t blk = 0; blk < nblk; blk++)
                acc += first[blk * (K + 1) + k];
            if (k < K)
                bias_grad[h * K + k] = acc;
            else
                loss[h] = acc * inv_n;
        }
    }
}

#endif
