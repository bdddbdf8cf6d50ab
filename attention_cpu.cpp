// Attention of a few query rows against a KV cache, for the compiled CPU decode step and tree verify
// (model.Attention; loaded by generate.load_cpu_attention). Built with AVX-512 (and AVX512-BF16 where the
// CPU has it); elsewhere the model keeps its PyTorch formulation (model.few_rows_attention).
//
// Why a kernel: Inductor's code for the same math computes each score as a 64-wide product followed by a
// horizontal sum, and splits the work over threads by query row. Here 16 scores come out of one transposed
// sum (sum16), bf16 scores take two steps of d per vdpbf16ps, and the cache slots are split between the
// threads (merged as in flash-decoding). AMD EPYC (2 cores, AVX512-BF16), 2026-12-07, bf16, 3 kv heads,
// 320 slots, one compiled graph of 30 layers each with its own cache, per layer (two runs): 3 rows 25-29 us
// against 39-42 for the compiled PyTorch version (model.few_rows_attention), 12 rows 62-72 against 132-150,
// 24 rows 94-98 against 211-277. One call alone on a cache already in L2: 8.9 / 22 / 41 us.
//
// Inputs: q [B, H, R, D], k and v [B, H, S >= W, D] (any strides, last dim contiguous; only the first W slots
// are read, so the model passes its whole cache), mask [B or 1, 1, Rm, W] bool where row r of q uses mask row
// r % Rm (GQA: the query heads sharing a kv head are stacked as rows).
// Scores and softmax in fp32; D a multiple of 16 up to 128.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

static inline __m512 ld(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 ld(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline __m512 ld(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
static inline void st(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
static inline void st(at::BFloat16* p, __m512 x) {  // round to nearest even, as c10::BFloat16 does (inputs are finite)
  __m512i u = _mm512_castps_si512(x);
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
  _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
}
static inline void st(at::Half* p, __m512 x) { _mm256_storeu_si256((__m256i*)p, _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT)); }

// lane i of the result = the sum of the 16 lanes of a[i]
static inline __m512 sum16(const __m512* a) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; i++)
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; i++) {
    __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; i++)
    d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88), _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d[0], d[1], 0x88), _mm512_shuffle_f32x4(d[0], d[1], 0xDD));
}

// scores s[r][j - j0] = scale * q_r . k_j for 16 slots j0..j0+15 (slots past n are zero rows)
template <typename T, int DV>
static inline void scores16(const T* q, int64_t q_rs, const T* k, int64_t k_rs, int64_t n, int64_t R,
                            float scale, float* s, int64_t s_rs, float* kf) {
  constexpr int D = DV * 16;
  const __m512 vs = _mm512_set1_ps(scale);
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<T, at::BFloat16> && DV % 2 == 0) {
    // two steps of d in one vdpbf16ps: no conversion of k, half the multiply-adds
    __m512i kb[16][DV / 2];
    for (int i = 0; i < 16; i++)
      for (int c = 0; c < DV / 2; c++)
        kb[i][c] = i < n ? _mm512_loadu_si512((const void*)(k + i * k_rs + c * 32)) : _mm512_setzero_si512();
    for (int64_t r = 0; r < R; r++) {
      __m512bh qv[DV / 2];
      for (int c = 0; c < DV / 2; c++) qv[c] = (__m512bh)_mm512_loadu_si512((const void*)(q + r * q_rs + c * 32));
      __m512 a[16];
      for (int i = 0; i < 16; i++) {
        __m512 x = _mm512_dpbf16_ps(_mm512_setzero_ps(), qv[0], (__m512bh)kb[i][0]);
        for (int c = 1; c < DV / 2; c++) x = _mm512_dpbf16_ps(x, qv[c], (__m512bh)kb[i][c]);
        a[i] = x;
      }
      _mm512_storeu_ps(s + r * s_rs, _mm512_mul_ps(sum16(a), vs));
    }
    return;
  }
#endif
  for (int i = 0; i < 16; i++)
    for (int c = 0; c < DV; c++) st(kf + i * D + c * 16, i < n ? ld(k + i * k_rs + c * 16) : _mm512_setzero_ps());
  for (int64_t r = 0; r < R; r++) {
    __m512 qv[DV], a[16];
    for (int c = 0; c < DV; c++) qv[c] = ld(q + r * q_rs + c * 16);
    for (int i = 0; i < 16; i++) {
      __m512 x = _mm512_mul_ps(qv[0], ld(kf + i * D));
      for (int c = 1; c < DV; c++) x = _mm512_fmadd_ps(qv[c], ld(kf + i * D + c * 16), x);
      a[i] = x;
    }
    _mm512_storeu_ps(s + r * s_rs, _mm512_mul_ps(sum16(a), vs));
  }
}

// One (batch, kv head, chunk of slots [j0, j1)): R query rows. Leaves per row the chunk's max score mx[r],
// sum of exp(s - mx) l[r], and acc[r][:] = sum_j exp(s_j - mx) v_j (not yet divided).
template <typename T, int DV>
static void attend_chunk(const T* q, int64_t q_rs, const T* k, int64_t k_rs, const T* v, int64_t v_rs,
                         const bool* m, int64_t m_rs, int64_t m_rows, int64_t R, int64_t j0, int64_t j1,
                         float scale, float* s, float* mx, float* l, float* acc) {
  constexpr int D = DV * 16;
  const int64_t W = j1 - j0, Wp = (W + 15) / 16 * 16;
  alignas(64) float kf[16 * D];
  for (int64_t j = 0; j < Wp; j += 16)
    scores16<T, DV>(q, q_rs, k + (j0 + j) * k_rs, k_rs, std::min<int64_t>(16, W - j), R, scale, s + j, Wp, kf);
  const float NINF = -std::numeric_limits<float>::infinity();
  const __m512 ninf = _mm512_set1_ps(NINF);
  for (int64_t r = 0; r < R; r++) {
    float* sr = s + r * Wp;
    const bool* mr = m + (r % m_rows) * m_rs + j0;
    __m512 vmx = ninf;
    for (int64_t j = 0; j < Wp; j += 16) {
      __mmask16 in = j + 16 <= W ? (__mmask16)0xFFFF : (__mmask16)((1u << (W - j)) - 1);
      __m128i mb = _mm_maskz_loadu_epi8(in, mr + j);
      __m512 x = _mm512_mask_blend_ps(_mm_test_epi8_mask(mb, mb), ninf, _mm512_loadu_ps(sr + j));
      _mm512_storeu_ps(sr + j, x);
      vmx = _mm512_max_ps(vmx, x);
    }
    mx[r] = _mm512_reduce_max_ps(vmx);
    if (mx[r] == NINF) {   // nothing visible in this chunk: it adds nothing
      l[r] = 0.f;
      for (int64_t j = 0; j < Wp; j += 16) _mm512_storeu_ps(sr + j, _mm512_setzero_ps());
      continue;
    }
    const __m512 vm = _mm512_set1_ps(mx[r]);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < Wp; j += 16) {
      __m512 e = at::vec::Vectorized<float>(_mm512_sub_ps(_mm512_loadu_ps(sr + j), vm)).exp_u20();
      _mm512_storeu_ps(sr + j, e);
      sum = _mm512_add_ps(sum, e);
    }
    l[r] = _mm512_reduce_add_ps(sum);
  }
  constexpr int G = DV <= 4 ? 4 : 2;
  for (int64_t r0 = 0; r0 < R; r0 += G) {
    const int64_t gn = std::min<int64_t>(G, R - r0);
    __m512 a[G][DV];
    for (int g = 0; g < G; g++)
      for (int c = 0; c < DV; c++) a[g][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < W; j++) {
      __m512 vv[DV];
      for (int c = 0; c < DV; c++) vv[c] = ld(v + (j0 + j) * v_rs + c * 16);
      for (int g = 0; g < G; g++) {
        if (g < gn) {
          const __m512 p = _mm512_set1_ps(s[(r0 + g) * Wp + j]);
          for (int c = 0; c < DV; c++) a[g][c] = _mm512_fmadd_ps(p, vv[c], a[g][c]);
        }
      }
    }
    for (int g = 0; g < gn; g++)
      for (int c = 0; c < DV; c++) _mm512_storeu_ps(acc + (r0 + g) * D + c * 16, a[g][c]);
  }
}

template <typename T, int DV>
static void attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                   at::Tensor& out) {
  constexpr int D = DV * 16;
  const int64_t B = q.size(0), H = q.size(1), R = q.size(2), W = mask.size(3);
  const float scale = 1.0f / std::sqrt((float)D);
  // Slots are split into C chunks (merged flash-decoding style) when the heads alone would leave a thread idle.
  // C depends on the shapes and thread count only, never on the rows, so a row's result does not depend on
  // how many other rows came with it.
  const int64_t nt = at::get_num_threads();
  const int64_t C = (B * H) % nt == 0 || W < 64 ? 1 : std::min<int64_t>(nt, W / 32);
  const int64_t cw = (W + C - 1) / C + 15 & ~int64_t(15);  // chunk width, a multiple of 16
  std::vector<float> mx(B * H * C * R), l(B * H * C * R), acc(B * H * C * R * D);
  const T* qp = q.data_ptr<T>(); const T* kp = k.data_ptr<T>(); const T* vp = v.data_ptr<T>();
  const bool* mp = mask.data_ptr<bool>();
  auto work = [&](int64_t t0, int64_t t1) {
    std::vector<float> s(R * (cw + 16));
    for (int64_t t = t0; t < t1; t++) {
      const int64_t b = t / (H * C), h = t / C % H, c = t % C;
      const int64_t j0 = std::min(W, c * cw), j1 = std::min(W, j0 + cw);
      if (j0 == j1) { for (int64_t r = 0; r < R; r++) { mx[t * R + r] = -INFINITY; l[t * R + r] = 0.f; } continue; }
      attend_chunk<T, DV>(qp + b * q.stride(0) + h * q.stride(1), q.stride(2),
                          kp + b * k.stride(0) + h * k.stride(1), k.stride(2),
                          vp + b * v.stride(0) + h * v.stride(1), v.stride(2),
                          mp + (mask.size(0) > 1 ? b * mask.stride(0) : 0), mask.stride(2), mask.size(2), R, j0, j1,
                          scale, s.data(), &mx[t * R], &l[t * R], &acc[t * R * D]);
    }
  };
  const int64_t tasks = B * H * C;
  if (tasks * R * W * D < (1 << 15)) work(0, tasks); else at::parallel_for(0, tasks, 1, work);
  T* op = out.data_ptr<T>();
  for (int64_t bh = 0; bh < B * H; bh++)
    for (int64_t r = 0; r < R; r++) {
      float M = -INFINITY;
      for (int64_t c = 0; c < C; c++) M = std::max(M, mx[(bh * C + c) * R + r]);
      __m512 o[DV];
      for (int d = 0; d < DV; d++) o[d] = _mm512_setzero_ps();
      float L = 0.f;
      for (int64_t c = 0; c < C; c++) {
        const int64_t i = (bh * C + c) * R + r;
        if (l[i] == 0.f) continue;
        const float w = C == 1 ? 1.f : std::exp(mx[i] - M);
        L += w * l[i];
        for (int d = 0; d < DV; d++) o[d] = _mm512_fmadd_ps(_mm512_set1_ps(w), _mm512_loadu_ps(&acc[i * D + d * 16]), o[d]);
      }
      const __m512 inv = _mm512_set1_ps(1.f / L);
      T* dst = op + (bh / H) * out.stride(0) + (bh % H) * out.stride(1) + r * out.stride(2);
      for (int d = 0; d < DV; d++) st(dst + d * 16, _mm512_mul_ps(o[d], inv));
    }
}

template <typename T>
static void attend_any(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                       at::Tensor& out) {
  switch (q.size(3) / 16) {
    case 1: attend<T, 1>(q, k, v, mask, out); break;
    case 2: attend<T, 2>(q, k, v, mask, out); break;
    case 3: attend<T, 3>(q, k, v, mask, out); break;
    case 4: attend<T, 4>(q, k, v, mask, out); break;
    case 5: attend<T, 5>(q, k, v, mask, out); break;
    case 6: attend<T, 6>(q, k, v, mask, out); break;
    case 7: attend<T, 7>(q, k, v, mask, out); break;
    case 8: attend<T, 8>(q, k, v, mask, out); break;
  }
}

at::Tensor few_rows_attention(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor mask) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && mask.dim() == 4, "few_rows_attention: 4-d inputs");
  const int64_t D = q.size(3);
  TORCH_CHECK(D % 16 == 0 && D <= 128, "few_rows_attention: head_dim a multiple of 16 up to 128, got ", D);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == D,
              "few_rows_attention: k, v must be [B, H, W, D] like q");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.size(1) == 1 && mask.size(3) <= k.size(2) &&
              (mask.size(0) == 1 || mask.size(0) == q.size(0)) && q.size(2) % mask.size(2) == 0,
              "few_rows_attention: mask must be bool [B or 1, 1, Rm, W] with Rm dividing the rows");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "few_rows_attention: q, k, v of one dtype");
  if (q.stride(3) != 1) q = q.contiguous();
  if (k.stride(3) != 1) k = k.contiguous();
  if (v.stride(3) != 1) v = v.contiguous();
  if (mask.stride(3) != 1) mask = mask.contiguous();
  auto out = at::empty(q.sizes(), q.options());
  switch (q.scalar_type()) {
    case at::kFloat: attend_any<float>(q, k, v, mask, out); break;
    case at::kBFloat16: attend_any<at::BFloat16>(q, k, v, mask, out); break;
    case at::kHalf: attend_any<at::Half>(q, k, v, mask, out); break;
    default: TORCH_CHECK(false, "few_rows_attention: float32, bfloat16 or float16");
  }
  return out;
}

TORCH_LIBRARY(eaglet, m) { m.def("few_rows_attention(Tensor q, Tensor k, Tensor v, Tensor mask) -> Tensor"); }
TORCH_LIBRARY_IMPL(eaglet, CPU, m) { m.impl("few_rows_attention", &few_rows_attention); }
