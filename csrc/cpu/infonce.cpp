// Sparse InfoNCE on the CPU, the same contract as pixcon_kernels.infonce: per query m, cosine
// logits s_j = cos(a_m, k_j) / t against one positive (a row of pos_pool) and N negatives (rows of
// pool, -1 = absent), an online log-sum-exp; the forward keeps (loss, lse) per query and the
// backward recomputes the logits from the indices. Nothing of size M x N is stored.
//   dL/da   = g / (t |a|) * (sum_j w_j k^_j - (sum_j w_j cos_j) a^),  w_j = softmax_j - [j = 0]
//   dL/dk_j = g w_j / (t |k_j|) * (a^ - cos_j k^_j)                   (key_grad only)
// Queries run in parallel; key gradients (scattered into shared rows) are accumulated by one
// thread in query order, so every result is independent of the thread count. Bottleneck: the
// gathered rows (M x (N + 1) x D reads, from cache for pools of a few hundred MB at most).
// Without key gradients the forward also keeps, per query, the softmax-weighted mean of its unit
// keys v = sum_j softmax_j k^_j (positive included; rescaled with the running maximum like the
// sum itself) and cbar = sum_j softmax_j cos_j: then dL/da = g / (t |a|) ((v - p^) - (cbar -
// cos_0) a^) needs no key again, and the backward is a scale and a scatter (pixcon.ops._library).
// keys (optional): the negatives are rows of this (S, D) tensor instead of pool's (U2PL's queue
// bank); their norms are taken as they are read (a bank is much larger than what one call reads),
// and they get no gradient.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "memory.h"
#include "parallel.h"
#include "pool.h"
#include "vec.h"

namespace pixcon {
namespace {

// Each norm is clamped to at least eps (torch.cosine_similarity's; pixcon.reference.common.EPS).
constexpr double eps = 1e-8;

template <typename A, typename T, typename U>
A dot(const T* a, int64_t sa, const U* b, int64_t sb, int64_t D) {
  A acc = 0;
  for (int64_t d = 0; d < D; ++d) acc += static_cast<A>(a[d * sa]) * static_cast<A>(b[d * sb]);
  return acc;
}

// Dot product of two contiguous rows: vector lanes (vec.h) where both rows are already in the
// accumulation type, four partial sums otherwise (half / bfloat16 rows); a fixed order either way,
// so the same bits on any thread count. Compiled per ISA: this and row_scale_add are the inner
// loops of every gathered row.
template <typename A, typename T, typename U>
__attribute__((target_clones("avx512f", "avx2", "default")))
A dot_rows(const T* a, const U* b, int64_t D) {
  if constexpr (std::is_same_v<T, A> && std::is_same_v<U, A>) {
    return pixcon::dot(a, b, D);
  } else {
    A s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int64_t d = 0;
    for (; d + 4 <= D; d += 4) {
      s0 += static_cast<A>(a[d]) * static_cast<A>(b[d]);
      s1 += static_cast<A>(a[d + 1]) * static_cast<A>(b[d + 1]);
      s2 += static_cast<A>(a[d + 2]) * static_cast<A>(b[d + 2]);
      s3 += static_cast<A>(a[d + 3]) * static_cast<A>(b[d + 3]);
    }
    for (; d < D; ++d) s0 += static_cast<A>(a[d]) * static_cast<A>(b[d]);
    return (s0 + s1) + (s2 + s3);
  }
}

// y = y * s + c * x for a row x of D (y in the accumulation type)
template <typename A, typename T>
__attribute__((target_clones("avx512f", "avx2", "default")))
void row_scale_add(A* __restrict__ y, A s, A c, const T* __restrict__ x, int64_t D) {
  if constexpr (std::is_same_v<T, A>) {
    scale_add(y, s, c, x, D);
  } else {
    for (int64_t d = 0; d < D; ++d) y[d] = y[d] * s + c * static_cast<A>(x[d]);
  }
}

// The index tensors as contiguous int64 and the positives (R x D, small) in the accumulation
// type, shared by the forward and the backward.
struct Inputs {
  at::ScalarType acc;
  at::Tensor q, pi, ni, pos;
  Inputs(const at::Tensor& pool, const at::Tensor& pos_pool, const at::Tensor& q_idx,
         const at::Tensor& pos_idx, const at::Tensor& neg_idx)
      : acc(pool.scalar_type() == at::kDouble ? at::kDouble : at::kFloat),
        q(q_idx.to(at::kLong).contiguous()), pi(pos_idx.to(at::kLong).contiguous()),
        ni(neg_idx.to(at::kLong).contiguous()), pos(pos_pool.to(acc)) {}
};

// Ask for every cache line of a row that will be read soon (the gathers are random rows).
template <typename T>
inline void prefetch_row(const T* row, int64_t D) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < D * static_cast<int64_t>(sizeof(T)); off += 64)
    __builtin_prefetch(p + off);
}

// How many gathered rows ahead the loops ask for (ReCo at VOC, 2 threads: 2 rows ahead left the
// dot products waiting on memory, 4 to 8 were as fast as each other)
constexpr int64_t kAhead = 4;

template <typename A>
A inv_norm(A sq, double eps) { return A(1) / std::max(std::sqrt(sq), static_cast<A>(eps)); }

// The pool as contiguous (P, D) rows (a channels-first map's rows are strided by h*w: every
// gathered row would touch D cache lines) -- a transient copy, never saved -- and the inverse
// norm 1 / max(|row|, eps) of every row, computed once instead of once per use.
// A dense channels-first map is transposed here in blocks of kPixelBlock pixels (pool.h: written
// as rows while in L1, their norms taken there), each thread writing its own run of pixels into
// a fresh block on huge pages. ATen's permuted copy into fresh memory took 37-40 ms at U2PL's
// 68 MB map (most of it first-touch faults taken by threads writing interleaved pieces of the
// same pages); this, about a third of that.

template <typename T, typename A>
std::pair<at::Tensor, at::Tensor> rows_and_inv_norms(const at::Tensor& pool, double eps) {
  const int64_t D = pool.size(1);
  const auto acc = c10::CppTypeToScalarType<A>::value;
  if (pool.dim() == 4 && pool.is_contiguous() && D > 1 && pool.numel() > 0) {
    const int64_t B = pool.size(0), HW = pool.size(2) * pool.size(3), P = B * HW;
    auto rows = empty_large({P, D}, pool.options());
    auto inv = at::empty({P}, pool.options().dtype(acc));
    const T* src = pool.template data_ptr<T>();
    T* dst = rows.template data_ptr<T>();
    A* ip = inv.template data_ptr<A>();
    const int64_t per_image = (HW + kPixelBlock - 1) / kPixelBlock, blocks = B * per_image;
    at::parallel_for(0, blocks, grain_for(blocks, kPixelBlock * D), [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t b = k / per_image, s0 = (k % per_image) * kPixelBlock;
        const int64_t n = std::min(kPixelBlock, HW - s0);
        T* out = dst + (b * HW + s0) * D;
        pixel_rows_block(src + b * D * HW, HW, D, s0, n, out);
        for (int64_t i = 0; i < n; ++i)
          ip[b * HW + s0 + i] = inv_norm(dot_rows<A>(out + i * D, out + i * D, D), eps);
      }
    });
    return {rows, inv};
  }
  at::Tensor rows = pool.dim() == 4 ? pool.permute({0, 2, 3, 1}) : pool;
  rows = rows.contiguous().reshape({-1, D});
  const int64_t P = rows.size(0);
  auto inv = at::empty({P}, pool.options().dtype(acc));
  const T* x = rows.template data_ptr<T>();
  A* ip = inv.template data_ptr<A>();
  at::parallel_for(0, P, grain_for(P, D, 256), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) ip[p] = inv_norm(dot_rows<A>(x + p * D, x + p * D, D), eps);
  });
  return {rows, inv};
}

// What both passes read, as pointers: the pool's contiguous rows and their inverse norms (see
// rows_and_inv_norms), the positives, and the query / positive / negative indices.
template <typename T, typename A>
struct Views {
  at::Tensor rows, inv, krows, local;    // owners of x, qinv, kx and (with keys) qp
  const T *x, *kx;                // query rows; negative rows (x itself without keys)
  const A *qinv, *pp;
  const int64_t *qp, *pip, *np;
  double eps;
  // 1 / max(|k|, eps) of negative row k_idx: precomputed for pool rows, taken as read for keys
  A kinv(int64_t k_idx, int64_t D) const {
    return kx == x ? qinv[k_idx] : inv_norm(dot_rows<A>(kx + k_idx * D, kx + k_idx * D, D), eps);
  }
};

// The queries' own rows (M, D) and inverse norms, row m for query m (zeros where q < 0): all a
// pass reads of the pool when the negatives come from separate keys. A channels-first map's row
// is D values h*w apart; reading M of them beats transposing the whole map when M is a small
// part of it (U2PL at VOC: 5,376 anchors of 66,564 pixels).
template <typename T, typename A>
std::pair<at::Tensor, at::Tensor> query_rows(const at::Tensor& pool, const int64_t* qp, int64_t M,
                                             double eps) {
  const Pool pl(pool);
  const int64_t D = pl.D;
  auto rows = at::empty({M, D}, pool.options());
  auto inv = at::empty({M}, pool.options().dtype(c10::CppTypeToScalarType<A>::value));
  const T* src = pl.t.template data_ptr<T>();
  T* dst = rows.template data_ptr<T>();
  A* ip = inv.template data_ptr<A>();
  at::parallel_for(0, M, grain_for(M, 4 * D), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      T* out = dst + m * D;
      if (qp[m] < 0) {
        for (int64_t d = 0; d < D; ++d) out[d] = T(0);
        ip[m] = A(0);
        continue;
      }
      const T* in = src + pl.row(qp[m]);
      for (int64_t d = 0; d < D; ++d) out[d] = in[d * pl.s_d];
      ip[m] = inv_norm(dot_rows<A>(out, out, D), eps);
    }
  });
  return {rows, inv};
}

template <typename T, typename A>
Views<T, A> views(const Inputs& in, const at::Tensor& pool, const std::optional<at::Tensor>& keys,
                  double eps) {
  const int64_t* qp = in.q.data_ptr<int64_t>();
  if (keys.has_value()) {            // only the queries' rows; query m reads row m
    const int64_t M = in.q.numel();
    auto [rows, inv] = query_rows<T, A>(pool, qp, M, eps);
    at::Tensor local = at::where(in.q >= 0, at::arange(M, in.q.options()), -1);
    at::Tensor krows = keys->contiguous();
    return {rows, inv, krows, local, rows.template data_ptr<T>(), krows.template data_ptr<T>(),
            inv.template data_ptr<A>(), in.pos.template data_ptr<A>(),
            local.data_ptr<int64_t>(), in.pi.data_ptr<int64_t>(), in.ni.data_ptr<int64_t>(), eps};
  }
  auto [rows, inv] = rows_and_inv_norms<T, A>(pool, eps);
  const T* x = rows.template data_ptr<T>();
  return {rows, inv, rows, at::Tensor(), x, x, inv.template data_ptr<A>(),
          in.pos.template data_ptr<A>(), qp, in.pi.data_ptr<int64_t>(),
          in.ni.data_ptr<int64_t>(), eps};
}

void check_keys(const at::Tensor& pool, const std::optional<at::Tensor>& keys, bool key_grad) {
  if (!keys.has_value()) return;
  TORCH_CHECK(keys->dim() == 2 && keys->size(1) == pool.size(1),
              "infonce: keys must be (S, D) with the pool's D");
  TORCH_CHECK(keys->scalar_type() == pool.scalar_type(), "infonce: keys must have pool's dtype");
  TORCH_CHECK(!key_grad, "infonce: a separate key pool gets no gradient (key_grad must be false)");
}

// The CPU kernels of pixcon::sparse_infonce and its backward (pixcon/ops/_library.py).
// Returns (loss (M,), lse (M,), v (M, D), cbar (M,)); v and cbar are zero-size unless
// keep_direction and not key_grad.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> infonce_fwd_cpu(
    const at::Tensor& pool_in, const at::Tensor& pos_pool, const at::Tensor& q_idx,
    const at::Tensor& pos_idx, const at::Tensor& neg_idx, double temperature, bool key_grad,
    bool keep_direction, const std::optional<at::Tensor>& keys) {
  const int64_t M = neg_idx.size(0), N = neg_idx.size(1), D = pool_in.size(1);
  check_keys(pool_in, keys, key_grad);
  const Inputs in(pool_in, pos_pool, q_idx, pos_idx, neg_idx);
  const auto& pos = in.pos;
  auto opts = pool_in.options().dtype(in.acc);
  auto loss = at::empty({M}, opts);
  auto lse = at::empty({M}, opts);
  const bool direction = keep_direction && !key_grad;
  auto vdir = direction ? at::zeros({M, D}, opts) : at::empty({0}, opts);
  auto cbar = direction ? at::zeros({M}, opts) : at::empty({0}, opts);
  const int64_t ps_r = pos.stride(0), ps_d = pos.stride(1);
  const double inv_t = 1.0 / temperature;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pool_in.scalar_type(), "infonce_fwd",
                                  [&] {
    using A = at::opmath_type<scalar_t>;
    const auto v = views<scalar_t, A>(in, pool_in, keys, eps);
    const scalar_t *x = v.x, *kx = v.kx;
    const A *qinv = v.qinv, *pp = v.pp;
    const int64_t *qp = v.qp, *pip = v.pip, *np = v.np;
    A *lp = loss.data_ptr<A>(), *ep = lse.data_ptr<A>();
    A* vp = direction ? vdir.data_ptr<A>() : nullptr;
    A* cp = direction ? cbar.data_ptr<A>() : nullptr;
    at::parallel_for(0, M, grain_for(M, 2 * (N + 1) * D), [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        if (qp[m] < 0) { lp[m] = 0; ep[m] = 0; continue; }
        const scalar_t* a = x + qp[m] * D;
        const A* p = pp + std::max<int64_t>(pip[m], 0) * ps_r;
        const A a_inv = qinv[qp[m]];
        const A p_inv = inv_norm(dot<A>(p, ps_d, p, ps_d, D), eps);
        const A s_pos = dot<A>(a, 1, p, ps_d, D) * a_inv * p_inv * A(inv_t);
        A mx = s_pos, l = 1, c = s_pos;              // c: sum of e^(s - mx) s (times t: cos)
        A* vs = direction ? vp + m * D : nullptr;    // sum of e^(s - mx) k^
        if (direction)
          for (int64_t d = 0; d < D; ++d) vs[d] = p[d * ps_d] * p_inv;
        for (int64_t j = 0; j < N; ++j) {
          const int64_t k_idx = np[m * N + j];
          if (j + kAhead < N && np[m * N + j + kAhead] >= 0)    // random rows: fetch ahead
            prefetch_row(kx + np[m * N + j + kAhead] * D, D);
          if (k_idx < 0) continue;
          const scalar_t* k = kx + k_idx * D;
          const A k_inv = v.kinv(k_idx, D);
          const A s = dot_rows<A>(a, k, D) * a_inv * k_inv * A(inv_t);
          A e, scale = 1;                            // this key's weight, the old sums' factor
          if (s > mx) { scale = std::exp(mx - s); e = 1; l = l * scale + 1; mx = s; }
          else { e = std::exp(s - mx); l += e; }
          if (!direction) continue;
          c = c * scale + e * s;
          row_scale_add(vs, scale, e * k_inv, k, D);
        }
        ep[m] = mx + std::log(l);
        lp[m] = ep[m] - s_pos;
        if (direction) {
          for (int64_t d = 0; d < D; ++d) vs[d] /= l;
          cp[m] = c / l * A(temperature);
        }
      }
    });
  });
  return {loss, lse, vdir, cbar};
}

// Returns (dq (M, D), dkeys (pool's logical shape, contiguous), dpos (pos_pool's shape)) in the
// accumulation dtype; dkeys and dpos are zero-size unless key_grad.
std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& pool_in, const at::Tensor& pos_pool,
    const at::Tensor& q_idx, const at::Tensor& pos_idx, const at::Tensor& neg_idx,
    const at::Tensor& lse_in, double temperature, bool key_grad,
    const std::optional<at::Tensor>& keys) {
  const int64_t M = neg_idx.size(0), N = neg_idx.size(1), D = pool_in.size(1);
  check_keys(pool_in, keys, key_grad);
  const Inputs in(pool_in, pos_pool, q_idx, pos_idx, neg_idx);
  const auto& pos = in.pos;
  auto opts = pool_in.options().dtype(in.acc);
  auto g_t = grad.to(in.acc).contiguous(), lse = lse_in.to(in.acc).contiguous();
  const int64_t ps_r = pos.stride(0), ps_d = pos.stride(1);
  auto dq = at::zeros({M, D}, opts);
  at::Tensor dk = at::empty({0}, opts), dpos = at::empty({0}, opts);
  if (key_grad) {                    // pool-sized zeros: on huge pages, zeroed by the threads
    dk = empty_large(pool_in.sizes(), opts);
    dpos = empty_large(pos_pool.sizes(), opts);
    zero_fill(dk);
    zero_fill(dpos);
  }
  const double inv_t = 1.0 / temperature;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pool_in.scalar_type(), "infonce_bwd",
                                  [&] {
    using A = at::opmath_type<scalar_t>;
    const auto v = views<scalar_t, A>(in, pool_in, keys, eps);
    const scalar_t *x = v.x, *kx = v.kx;
    const A *qinv = v.qinv, *pp = v.pp;
    const int64_t *qp = v.qp, *pip = v.pip, *np = v.np;
    const A *gp = g_t.data_ptr<A>(), *lp = lse.data_ptr<A>();
    A* dqp = dq.data_ptr<A>();
    // per query: the weights of its keys (w_0 for the positive, then the negatives)
    auto query = [&](int64_t m, std::vector<A>& w, std::vector<A>& cosv, A& a_inv, A& p_inv) {
      const scalar_t* a = x + qp[m] * D;
      const A* p = pp + std::max<int64_t>(pip[m], 0) * ps_r;
      a_inv = qinv[qp[m]];
      p_inv = inv_norm(dot<A>(p, ps_d, p, ps_d, D), eps);
      const A g = gp[m], l = lp[m];
      cosv[0] = dot<A>(a, 1, p, ps_d, D) * a_inv * p_inv;
      w[0] = g * (std::exp(cosv[0] * A(inv_t) - l) - 1);
      for (int64_t j = 0; j < N; ++j) {
        const int64_t k_idx = np[m * N + j];
        if (j + kAhead < N && np[m * N + j + kAhead] >= 0)
          prefetch_row(kx + np[m * N + j + kAhead] * D, D);
        if (k_idx < 0) { w[j + 1] = 0; cosv[j + 1] = 0; continue; }
        cosv[j + 1] = dot_rows<A>(a, kx + k_idx * D, D) * a_inv * v.kinv(k_idx, D);
        w[j + 1] = g * std::exp(cosv[j + 1] * A(inv_t) - l);
      }
    };
    at::parallel_for(0, M, grain_for(M, 2 * (N + 1) * D), [&](int64_t m0, int64_t m1) {
      std::vector<A> w(N + 1), cosv(N + 1);
      for (int64_t m = m0; m < m1; ++m) {
        if (qp[m] < 0) continue;
        A a_inv, p_inv;
        query(m, w, cosv, a_inv, p_inv);
        const scalar_t* a = x + qp[m] * D;
        const A* p = pp + std::max<int64_t>(pip[m], 0) * ps_r;
        A* out = dqp + m * D;
        A coef = w[0] * cosv[0];
        for (int64_t d = 0; d < D; ++d) out[d] = w[0] * p_inv * p[d * ps_d];
        for (int64_t j = 0; j < N; ++j) {
          const int64_t k_idx = np[m * N + j];
          if (k_idx < 0) continue;
          const scalar_t* k = kx + k_idx * D;
          const A c = w[j + 1] * v.kinv(k_idx, D);
          coef += w[j + 1] * cosv[j + 1];
          row_scale_add(out, A(1), c, k, D);
        }
        for (int64_t d = 0; d < D; ++d)
          out[d] = (out[d] - coef * a_inv * static_cast<A>(a[d])) * a_inv * A(inv_t);
      }
    });
    if (key_grad) {                       // one thread, query order: deterministic scatter
      const Pool dpool(dk);
      A* dkp = dk.data_ptr<A>();
      A* dpp = dpos.data_ptr<A>();
      const int64_t dps_r = dpos.stride(0), dps_d = dpos.stride(1);
      std::vector<A> w(N + 1), cosv(N + 1);
      for (int64_t m = 0; m < M; ++m) {
        if (qp[m] < 0) continue;
        A a_inv, p_inv;
        query(m, w, cosv, a_inv, p_inv);
        const scalar_t* a = x + qp[m] * D;
        const int64_t prow = std::max<int64_t>(pip[m], 0);
        const A* p = pp + prow * ps_r;
        for (int64_t d = 0; d < D; ++d)
          dpp[prow * dps_r + d * dps_d] += w[0] * A(inv_t) * p_inv *
              (static_cast<A>(a[d]) * a_inv - cosv[0] * p[d * ps_d] * p_inv);
        for (int64_t j = 0; j < N; ++j) {
          const int64_t k_idx = np[m * N + j];
          if (k_idx < 0) continue;
          const scalar_t* k = x + k_idx * D;          // key_grad: no separate keys
          const A k_inv = qinv[k_idx];
          A* dst = dkp + dpool.row(k_idx);
          for (int64_t d = 0; d < D; ++d)
            dst[d * dpool.s_d] += w[j + 1] * A(inv_t) * k_inv *
                (static_cast<A>(a[d]) * a_inv - cosv[j + 1] * static_cast<A>(k[d]) * k_inv);
        }
      }
    }
  });
  return {dq, dk, dpos};
}

}  // namespace

TORCH_LIBRARY_IMPL(pixcon, CPU, m) {
  m.impl("sparse_infonce", &infonce_fwd_cpu);
  m.impl("sparse_infonce_backward", &infonce_bwd_cpu);
}

}  // namespace pixcon
