// nanoseek::int8_gemv -- y = x (q * s)^T for a few rows x [R, K] (fp32 or bf16) against int8 codes q [N, K] with
// per-row scales s [N] (bf16), on AVX2: the kind of kernel llama.cpp's Q8_0 dot products are (see int8.py).
// nanoseek::int8_moe -- a decode step's routed experts (SwiGLU, int8 codes stacked [E, ...]) and the shared expert
// in one call.
//
// Each activation row is split into two signed 8-bit parts, x = m (hi + lo / 127), m = amax|x| / 127, so the error
// is at most m / 254 per value (~1e-5 of the row's largest value, against bf16's 2^-9 of each value). Every
// product of 32 codes is then two vpmaddubsw + vpmaddwd on bytes (the sign of the activation moved onto the code,
// so |x| is the unsigned operand: 2 * 127 * 127 fits int16), summed exactly in int32 per row; one float multiply
// per output at the end. Four weight rows share each activation load; the rows ahead are prefetched (4 KB); blocks
// of four rows are split over torch's threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <vector>
#include <cmath>
#include <cstdint>

namespace {

constexpr int64_t kPrefetch = 4096;  // bytes ahead of each weight row read (prefetches do not fault past the end)

inline int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// 32 products a * w (a = x's part: |a| unsigned, its sign moved onto w) -> 8 int32 partial sums
inline __m256i dot32(__m256i abs_a, __m256i a, __m256i w) {
  const __m256i ones = _mm256_set1_epi16(1);
  return _mm256_madd_epi16(_mm256_maddubs_epi16(abs_a, _mm256_sign_epi8(w, a)), ones);
}

// the two parts of one activation row, and its scale m
inline float split_row(const float* x, int64_t k, int8_t* hi, int8_t* lo) {
  const int64_t k8 = k / 8 * 8;
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 vmax = _mm256_setzero_ps();
  for (int64_t i = 0; i < k8; i += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
  float lanes[8];
  _mm256_storeu_ps(lanes, vmax);
  float amax = 0.f;
  for (float v : lanes) amax = std::max(amax, v);
  for (int64_t i = k8; i < k; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float m = amax > 0.f ? amax / 127.f : 1.f;
  const float inv = 1.f / m;
  const __m256 vinv = _mm256_set1_ps(inv), v127 = _mm256_set1_ps(127.f);
  constexpr int nearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  for (int64_t i = 0; i < k8; i += 8) {  // |x| * inv <= 127 (+ rounding): hi in [-127, 127]
    const __m256 v = _mm256_min_ps(v127, _mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), v127),
                                                       _mm256_mul_ps(_mm256_loadu_ps(x + i), vinv)));
    const __m256 h = _mm256_round_ps(v, nearest);
    const __m256 l = _mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(v, h), v127), nearest);  // |v - h| <= 1/2
    int32_t hs[8], ls[8];
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(hs), _mm256_cvtps_epi32(h));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(ls), _mm256_cvtps_epi32(l));
    for (int j = 0; j < 8; ++j) {
      hi[i + j] = static_cast<int8_t>(hs[j]);
      lo[i + j] = static_cast<int8_t>(ls[j]);
    }
  }
  for (int64_t i = k8; i < k; ++i) {
    const float v = std::min(127.f, std::max(-127.f, x[i] * inv));
    const float h = std::nearbyint(v);
    hi[i] = static_cast<int8_t>(h);
    lo[i] = static_cast<int8_t>(std::nearbyint((v - h) * 127.f));
  }
  return m;
}

// integer dots of rows w[0..NW) (stride k) with one activation row's parts -> sums_hi, sums_lo
template <int NW>
inline void dot_rows_n(const int8_t* w, int64_t k, const int8_t* hi, const int8_t* lo, int32_t* sh, int32_t* sl) {
  __m256i ah[NW], al[NW];
  for (int j = 0; j < NW; ++j) ah[j] = al[j] = _mm256_setzero_si256();
  const int64_t k32 = k / 32 * 32;
  for (int64_t i = 0; i < k32; i += 32) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi + i));
    const __m256i l = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo + i));
    const __m256i habs = _mm256_abs_epi8(h), labs = _mm256_abs_epi8(l);
    for (int j = 0; j < NW; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(w + j * k + i + kPrefetch), _MM_HINT_T0);
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * k + i));
      ah[j] = _mm256_add_epi32(ah[j], dot32(habs, h, wv));
      al[j] = _mm256_add_epi32(al[j], dot32(labs, l, wv));
    }
  }
  for (int j = 0; j < NW; ++j) {
    int32_t a = hsum(ah[j]), b = hsum(al[j]);
    for (int64_t i = k32; i < k; ++i) {  // a tail shorter than 32
      a += int32_t(hi[i]) * w[j * k + i];
      b += int32_t(lo[i]) * w[j * k + i];
    }
    sh[j] = a;
    sl[j] = b;
  }
}

// the same for nw <= 4 rows (fewer than 4 only in a matrix's last block)
inline void dot_rows(const int8_t* w, int64_t k, int nw, const int8_t* hi, const int8_t* lo, int32_t* sh,
                     int32_t* sl) {
  switch (nw) {
    case 4: return dot_rows_n<4>(w, k, hi, lo, sh, sl);
    case 3: return dot_rows_n<3>(w, k, hi, lo, sh, sl);
    case 2: return dot_rows_n<2>(w, k, hi, lo, sh, sl);
    default: return dot_rows_n<1>(w, k, hi, lo, sh, sl);
  }
}

// x as contiguous fp32 rows (itself when it already is: no dispatcher call)
inline at::Tensor fp32_rows(const at::Tensor& x) {
  return x.scalar_type() == at::kFloat && x.is_contiguous() ? x : x.to(at::kFloat).contiguous();
}

inline void prefetch_span(const int8_t* p, int64_t bytes) {
  for (int64_t i = 0; i < std::min(bytes, kPrefetch); i += 64)
    _mm_prefetch(reinterpret_cast<const char*>(p + i), _MM_HINT_T0);
}

// y[r * ldy + n] for the rows n of block b (4b .. 4b + 3, fewer at the end) of q [N, K], scales s, against R split
// activation rows (hi, lo [R, K], scales m [R])
inline void block_rows(const int8_t* q, const at::BFloat16* s, int64_t N, int64_t K, int64_t b, int64_t R,
                       const int8_t* hi, const int8_t* lo, const float* m, float* y, int64_t ldy) {
  int32_t sh[4], sl[4];
  const int64_t n0 = b * 4;
  const int nw = static_cast<int>(std::min<int64_t>(4, N - n0));
  for (int64_t r = 0; r < R; ++r) {
    dot_rows(q + n0 * K, K, nw, hi + r * K, lo + r * K, sh, sl);
    for (int j = 0; j < nw; ++j)
      y[r * ldy + n0 + j] = static_cast<float>(s[n0 + j]) * m[r] * (sh[j] + sl[j] * (1.f / 127.f));
  }
}

// blocks of 4 rows per thread: at least ~16K codes, below which waking the other thread costs more than it saves
inline int64_t grain(int64_t K) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(4 * K, 1)); }

void check_codes(const at::Tensor& q, const at::Tensor& s, int64_t dims, const char* what) {
  TORCH_CHECK(q.dim() == dims && s.dim() == dims - 1, what, ": codes of ", dims, " dimensions and scales of ",
              dims - 1);
  TORCH_CHECK(q.scalar_type() == at::kChar, what, ": q must be int8");
  TORCH_CHECK(s.scalar_type() == at::kBFloat16, what, ": s must be bfloat16");
}

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s) {
  check_codes(q, s, 2, "int8_gemv");
  TORCH_CHECK(x.dim() == 2, "int8_gemv: x [R, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "int8_gemv: x fp32 or bf16");
  const int64_t R = x.size(0), K = x.size(1), N = q.size(0);
  TORCH_CHECK(q.size(1) == K && s.size(0) == N, "int8_gemv: shapes do not match");
  const at::Tensor xc = fp32_rows(x), qc = q.contiguous(), sc = s.contiguous();
  std::vector<int8_t> parts(2 * R * K);
  int8_t *hi = parts.data(), *lo = hi + R * K;
  std::vector<float> m(R);
  for (int64_t r = 0; r < R; ++r) m[r] = split_row(xc.data_ptr<float>() + r * K, K, hi + r * K, lo + r * K);
  at::Tensor y = at::empty({R, N}, x.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  const int8_t* qp = qc.data_ptr<int8_t>();
  const at::BFloat16* sp = sc.data_ptr<at::BFloat16>();
  at::parallel_for(0, (N + 3) / 4, grain(K), [&](int64_t b0, int64_t b1) {
    prefetch_span(qp + b0 * 4 * K, (b1 - b0) * 4 * K);  // the first rows at once; dot_rows prefetches ahead of itself
    for (int64_t b = b0; b < b1; ++b) block_rows(qp, sp, N, K, b, R, hi, lo, m.data(), yp, N);
  });
  return x.scalar_type() == at::kFloat ? y : y.to(at::kBFloat16);
}

// One SwiGLU product of a decode step: weight * down(silu(gate x_t) * up x_t), gate and up [I, H], down [H, I]
struct Pair {
  const int8_t *gate, *up, *down;
  const at::BFloat16 *gate_s, *up_s, *down_s;
  int64_t I, t, h_off, a_off;  // intermediate size, token, offsets of its gate/up outputs in h and its SwiGLU in a
  float weight;
};

// A decode step's routed experts (int8 codes stacked [E, ...], gate and up stacked as [E, 2I, H]) and, if given
// (non-empty), the shared expert (its own gate, up, down) in one call: y_t = sum_k w_tk E_idx_tk(x_t) + S(x_t).
// Two passes over all products -- gate and up, then down -- each one parallel region (llama.cpp's mul_mat_id).
at::Tensor int8_moe(const at::Tensor& x, const at::Tensor& idx, const at::Tensor& w, const at::Tensor& gate_up,
                    const at::Tensor& gate_up_s, const at::Tensor& down, const at::Tensor& down_s,
                    const at::Tensor& sh_gate, const at::Tensor& sh_gate_s, const at::Tensor& sh_up,
                    const at::Tensor& sh_up_s, const at::Tensor& sh_down, const at::Tensor& sh_down_s) {
  check_codes(gate_up, gate_up_s, 3, "int8_moe gate_up");
  check_codes(down, down_s, 3, "int8_moe down");
  TORCH_CHECK(x.dim() == 2 && idx.dim() == 2 && w.sizes() == idx.sizes() && idx.size(0) == x.size(0),
              "int8_moe: x [T, H], idx and weights [T, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "int8_moe: x fp32 or bf16");
  const int64_t T = x.size(0), H = x.size(1), K = idx.size(1), E = gate_up.size(0), I = gate_up.size(1) / 2;
  TORCH_CHECK(gate_up.size(2) == H && gate_up.size(1) == 2 * I && down.size(0) == E && down.size(1) == H &&
                  down.size(2) == I, "int8_moe: expert shapes do not match");
  const bool shared = sh_gate.numel() > 0;
  const at::Tensor xc = fp32_rows(x), wc = fp32_rows(w);
  const at::Tensor ic = idx.scalar_type() == at::kLong && idx.is_contiguous() ? idx : idx.to(at::kLong).contiguous();
  const at::Tensor gc = gate_up.contiguous(), gsc = gate_up_s.contiguous(), dc = down.contiguous(),
                   dsc = down_s.contiguous();
  at::Tensor sg, sgs, su, sus, sd, sds;
  int64_t Is = 0;
  if (shared) {
    check_codes(sh_gate, sh_gate_s, 2, "int8_moe shared gate");
    check_codes(sh_up, sh_up_s, 2, "int8_moe shared up");
    check_codes(sh_down, sh_down_s, 2, "int8_moe shared down");
    Is = sh_gate.size(0);
    TORCH_CHECK(sh_gate.size(1) == H && sh_up.size(0) == Is && sh_up.size(1) == H && sh_down.size(0) == H &&
                    sh_down.size(1) == Is, "int8_moe: shared expert shapes do not match");
    sg = sh_gate.contiguous(), sgs = sh_gate_s.contiguous(), su = sh_up.contiguous(), sus = sh_up_s.contiguous();
    sd = sh_down.contiguous(), sds = sh_down_s.contiguous();
  }
  const int64_t* ip = ic.data_ptr<int64_t>();
  const float* wp = wc.data_ptr<float>();
  std::vector<Pair> pairs;
  int64_t h_size = 0, a_size = 0;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < K + shared; ++k) {
      Pair p;
      if (k < K) {
        const int64_t e = ip[t * K + k];
        TORCH_CHECK(e >= 0 && e < E, "int8_moe: expert index ", e, " not in [0, ", E, ")");
        p.gate = gc.data_ptr<int8_t>() + e * 2 * I * H, p.up = p.gate + I * H;
        p.down = dc.data_ptr<int8_t>() + e * H * I;
        p.gate_s = gsc.data_ptr<at::BFloat16>() + e * 2 * I, p.up_s = p.gate_s + I;
        p.down_s = dsc.data_ptr<at::BFloat16>() + e * H;
        p.I = I, p.weight = wp[t * K + k];
      } else {  // the shared expert: weight 1
        p.gate = sg.data_ptr<int8_t>(), p.up = su.data_ptr<int8_t>(), p.down = sd.data_ptr<int8_t>();
        p.gate_s = sgs.data_ptr<at::BFloat16>(), p.up_s = sus.data_ptr<at::BFloat16>();
        p.down_s = sds.data_ptr<at::BFloat16>();
        p.I = Is, p.weight = 1.f;
      }
      p.t = t, p.h_off = h_size, p.a_off = a_size;
      h_size += 2 * p.I, a_size += p.I;
      pairs.push_back(p);
    }
  }
  const int64_t P = static_cast<int64_t>(pairs.size());
  std::vector<int8_t> parts(2 * std::max(T * H, a_size));
  int8_t *hi = parts.data(), *lo = hi + std::max(T * H, a_size);
  std::vector<float> mx(T), ma(P), h(h_size), out(P * H);
  for (int64_t t = 0; t < T; ++t) mx[t] = split_row(xc.data_ptr<float>() + t * H, H, hi + t * H, lo + t * H);
  std::vector<int64_t> first(P + 1, 0);  // pass 1's blocks of 4 rows: pair p owns [first[p], first[p + 1])
  for (int64_t p = 0; p < P; ++p) first[p + 1] = first[p] + 2 * ((pairs[p].I + 3) / 4);
  at::parallel_for(0, first[P], grain(H), [&](int64_t i0, int64_t i1) {  // pass 1: gate x_t and up x_t
    int64_t p = std::upper_bound(first.begin(), first.end(), i0) - first.begin() - 1;
    for (int64_t i = i0; i < i1; ++i) {
      while (i >= first[p + 1]) ++p;
      const Pair& q = pairs[p];
      const int64_t nb = (q.I + 3) / 4, b = i - first[p], up = b >= nb, bb = up ? b - nb : b;
      const int8_t* m = up ? q.up : q.gate;
      if (i == i0 || bb == 0) prefetch_span(m + bb * 4 * H, (nb - bb) * 4 * H);
      block_rows(m, up ? q.up_s : q.gate_s, q.I, H, bb, 1, hi + q.t * H, lo + q.t * H, &mx[q.t],
                 h.data() + q.h_off + (up ? q.I : 0), q.I);
    }
  });
  for (int64_t p = 0; p < P; ++p) {  // silu(g) * u, split for pass 2
    const Pair& q = pairs[p];
    float* hp = h.data() + q.h_off;
    for (int64_t j = 0; j < q.I; ++j) hp[j] = hp[j] / (1.f + std::exp(-hp[j])) * hp[q.I + j];
    ma[p] = split_row(hp, q.I, hi + q.a_off, lo + q.a_off);
  }
  const int64_t nb2 = (H + 3) / 4;
  at::parallel_for(0, P * nb2, grain(std::min(I, shared ? Is : I)), [&](int64_t i0, int64_t i1) {  // pass 2: down
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t p = i / nb2, b = i % nb2;
      const Pair& q = pairs[p];
      if (i == i0 || b == 0) prefetch_span(q.down + b * 4 * q.I, (nb2 - b) * 4 * q.I);
      block_rows(q.down, q.down_s, H, q.I, b, 1, hi + q.a_off, lo + q.a_off, &ma[p], out.data() + p * H, H);
    }
  });
  at::Tensor y = at::zeros({T, H}, x.options().dtype(at::kFloat));  // the weighted sum, products in order
  float* yp = y.data_ptr<float>();
  for (int64_t p = 0; p < P; ++p)
    for (int64_t j = 0; j < H; ++j) yp[pairs[p].t * H + j] += pairs[p].weight * out[p * H + j];
  return x.scalar_type() == at::kFloat ? y : y.to(at::kBFloat16);
}

}  // namespace

TORCH_LIBRARY_IMPL(nanoseek, CPU, m) {
  m.impl("int8_gemv", &int8_gemv);
  m.impl("int8_moe", &int8_moe);
}
