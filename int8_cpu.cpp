// Weight-only int8 matmul of several rows for CPUs with AVX512-BF16: y = (x @ q.T) * s with q int8 per output
// channel, s its scale, x and y bfloat16 (quantize.WeightOnlyInt8Linear, from 2 rows of x: a tree verify, the
// draft's catch-up, a prefill; loaded by cpu_kernels.load). One row keeps aten's _weight_int8pack_mm, which
// Inductor's int8 GEMM template replaces in compiled decode steps; fp32 x and other CPUs keep it for all rows.
//
// Why a kernel: that template widens each code to fp32 and pays one fp32 FMA per weight and row, so a compiled
// 8-token SmolLM2 int8 verify cost 2.4x a decode step (18.5 against 7.6 ms on an AMD EPYC, 2026-12-07). Here a
// pair of k of 16 output rows becomes bf16 once (exact: |q| <= 127 needs 7 bits of mantissa), and one vdpbf16ps
// per row of x multiplies it, as int4_cpu.cpp does for int4: 13.5 ms for the same verify. The sums are fp32 and
// the scale is applied once at the end, so the result is the dequantized product up to fp32 rounding. A row's
// result does not depend on the other rows or on how many there are (same order of sums in every tile).
//
// Packed layout (quantize.pack_int8_for_eaglet_cpu, a copy made at load time from the file's [N, K] codes):
// int8 [N/16, K/2, 32]. For output block b (rows 16b..16b+15) and pair j, bytes 2l and 2l+1 are
// (q[16b+l, 2j], q[16b+l, 2j+1]): widened and converted, they become the bf16 pair one vdpbf16ps lane takes.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstring>

namespace eaglet_int8 {

// Software prefetch this many 32-byte pair rows ahead of each block's stream, into L2/L3 (as int4_cpu.cpp,
// whose stream is 64 bytes a step: the same distance in bytes).
constexpr int PREFETCH_STEPS = 512;

#if defined(__AVX512BF16__)

static inline void store_bf16(at::BFloat16* p, __m512 x) {  // round to nearest even, as c10::BFloat16 (finite x)
  __m512i u = _mm512_castps_si512(x);
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
  _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
}

// 32 int8 codes (16 lanes × a pair of k) → the same 32 numbers as bf16 pairs, lane order kept.
static inline __m512bh pairs_bf16(const int8_t* p) {
  const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
  const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(p + 16))));
  return _mm512_cvtne2ps_pbh(hi, lo);
}

// NB output blocks of 16 × MT rows of x over all of K: NB * MT accumulators.
template <int NB, int MT>
static inline void tile(const int8_t* w, int64_t w_bs, const at::BFloat16* s, const at::BFloat16* x, int64_t x_rs,
                        int64_t KP, at::BFloat16* y, int64_t y_rs) {
  __m512 acc[NB][MT];
  for (int b = 0; b < NB; b++)
    for (int m = 0; m < MT; m++) acc[b][m] = _mm512_setzero_ps();
  for (int64_t j = 0; j < KP; j++) {
    __m512bh d[NB];
    for (int b = 0; b < NB; b++) {
      if ((j & 1) == 0) _mm_prefetch((const char*)(w + b * w_bs + (j + PREFETCH_STEPS) * 32), _MM_HINT_T2);
      d[b] = pairs_bf16(w + b * w_bs + j * 32);
    }
    for (int m = 0; m < MT; m++) {
      int32_t pair;
      std::memcpy(&pair, x + m * x_rs + 2 * j, sizeof(pair));
      const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
      for (int b = 0; b < NB; b++) acc[b][m] = _mm512_dpbf16_ps(acc[b][m], d[b], a);
    }
  }
  for (int b = 0; b < NB; b++) {
    const __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(s + b * 16))), 16));
    for (int m = 0; m < MT; m++) store_bf16(y + m * y_rs + b * 16, _mm512_mul_ps(acc[b][m], sc));
  }
}

// The last r < MT rows of a block chunk, with a tile of exactly r rows.
template <int NB, int MT>
static inline void tail(int64_t r, const int8_t* w, int64_t w_bs, const at::BFloat16* s, const at::BFloat16* x,
                        int64_t x_rs, int64_t KP, at::BFloat16* y, int64_t y_rs) {
  if constexpr (MT > 0) {
    if (r == MT) tile<NB, MT>(w, w_bs, s, x, x_rs, KP, y, y_rs);
    else tail<NB, MT - 1>(r, w, w_bs, s, x, x_rs, KP, y, y_rs);
  }
}

// Blocks [b, b1) for all M rows: blocks in chunks of NB (the rest in chunks of NB/2, ...), rows in chunks of MT
// (a chunk's codes stay in L1/L2 while the row chunks pass over them).
template <int NB, int MT>
static void blocks(int64_t b, int64_t b1, const int8_t* w, int64_t w_bs, const at::BFloat16* s,
                   const at::BFloat16* x, int64_t M, int64_t K, int64_t KP, at::BFloat16* y, int64_t N) {
  for (; b + NB <= b1; b += NB) {
    int64_t m = 0;
    for (; m + MT <= M; m += MT)
      tile<NB, MT>(w + b * w_bs, w_bs, s + b * 16, x + m * K, K, KP, y + m * N + b * 16, N);
    if (m < M) tail<NB, MT - 1>(M - m, w + b * w_bs, w_bs, s + b * 16, x + m * K, K, KP, y + m * N + b * 16, N);
  }
  if constexpr (NB > 1) blocks<NB / 2, MT>(b, b1, w, w_bs, s, x, M, K, KP, y, N);
}

static void run(const at::Tensor& xt, const at::Tensor& wt, const at::Tensor& st, at::Tensor& yt) {
  const int64_t M = xt.size(0), K = xt.size(1), N = yt.size(1), NBLK = N / 16, KP = K / 2, w_bs = KP * 32;
  const at::BFloat16* x = xt.data_ptr<at::BFloat16>();
  const int8_t* w = wt.data_ptr<int8_t>();
  const at::BFloat16* s = st.data_ptr<at::BFloat16>();
  at::BFloat16* y = yt.data_ptr<at::BFloat16>();
  auto work = [&](int64_t b0, int64_t b1) {
    if (M == 1) blocks<8, 1>(b0, b1, w, w_bs, s, x, M, K, KP, y, N);
    else if (M == 2) blocks<8, 2>(b0, b1, w, w_bs, s, x, M, K, KP, y, N);
    else if (M <= 4) blocks<4, 4>(b0, b1, w, w_bs, s, x, M, K, KP, y, N);
    else if (M <= 8) blocks<2, 8>(b0, b1, w, w_bs, s, x, M, K, KP, y, N);
    else blocks<1, 16>(b0, b1, w, w_bs, s, x, M, K, KP, y, N);
  };
  at::parallel_for(0, NBLK, 1, work);
}

#endif

// x [M, K] bfloat16, w packed by quantize.pack_int8_for_eaglet_cpu [N/16, K/2, 32] int8, scales [N] bfloat16
// → y [M, N] bfloat16.
at::Tensor int8_mm(at::Tensor x, at::Tensor w, at::Tensor scales) {
#if defined(__AVX512BF16__)
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "int8_mm: x must be a 2-D bfloat16 tensor");
  TORCH_CHECK(w.dim() == 3 && w.size(2) == 32 && w.scalar_type() == at::kChar && w.is_contiguous(),
              "int8_mm: w must be contiguous int8 [N/16, K/2, 32] (quantize.pack_int8_for_eaglet_cpu)");
  TORCH_CHECK(x.size(1) == w.size(1) * 2, "int8_mm: x has ", x.size(1), " columns, w ", w.size(1) * 2);
  TORCH_CHECK(scales.dim() == 1 && scales.size(0) == w.size(0) * 16 && scales.scalar_type() == at::kBFloat16 &&
              scales.is_contiguous(), "int8_mm: scales must be contiguous bfloat16 [N]");
  x = x.contiguous();
  auto y = at::empty({x.size(0), w.size(0) * 16}, x.options());
  if (x.size(0) > 0) run(x, w, scales, y);
  return y;
#else
  TORCH_CHECK(false, "int8_mm: built without AVX512-BF16");
#endif
}

}  // namespace eaglet_int8

TORCH_LIBRARY_FRAGMENT(eaglet, m) { m.def("int8_mm(Tensor x, Tensor w, Tensor scales) -> Tensor"); }
TORCH_LIBRARY_IMPL(eaglet, CPU, m) { m.impl("int8_mm", &eaglet_int8::int8_mm); }
