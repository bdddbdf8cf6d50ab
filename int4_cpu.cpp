// Groupwise int4 weight-only matmul for CPUs with AVX512-BF16: y = x @ W.T with W[n, k] = (q[n, k] - 8) * s + z
// per group of k (quantize.WeightOnlyInt4Linear; loaded by cpu_kernels.load). Elsewhere the model keeps
// aten's _weight_int4pack_mm_for_cpu.
//
// Why a kernel: a decode step reads every weight once for one row of x, so the work per weight must be a couple
// of instructions. Here a code becomes a bf16 number by one table lookup (vpermw over the 16 values of q - 8,
// exact), and one vdpbf16ps multiplies two steps of k for 16 output rows. The group's scale and zero are
// applied once per group: sum_k x_k W_nk = s_n * sum_k x_k (q_nk - 8) + z_n * sum_k x_k, both sums exact in fp32
// (bf16 x times a small integer is exact), so the result is the dequantized product up to fp32 rounding.
// fp32 x takes fp32 FMAs on the same lookups. A row's result does not depend on the other rows (same order of
// sums whatever the row tiling), which fp32 greedy speculative decoding needs.
//
// AMD EPYC (2 cores, AVX512-BF16), 2026-12-07, 30 layers of SmolLM2 int4 g32 matmuls with distinct weights,
// medians of 15 interleaved: 1 row 2.9-3.4 ms against aten's _weight_int4pack_mm_for_cpu 3.96-4.35 ms, 8 rows
// 7.0 against 11.4. In the compiled SmolLM2 int4 forward (against Inductor's int4 template, one process):
// 1 token 6.88 -> 6.23 ms, 8 tokens 17.33 -> 12.20 ms.
//
// Packed layout (quantize.pack_int4_for_eaglet_cpu, done at load time from the file's codes): codes [N/16, K/8,
// 16, 4] uint8. For output block b (rows 16b..16b+15) and k-octet j, lane l's 32-bit word holds the codes of row
// 16b+l, columns 8j..8j+7, nibbles ordered k0 k2 k4 k6 k1 k3 k5 k7 from bit 0 up: shifted right by 4p, the low
// 16-bit half starts with k_{2p} and the high half with k_{2p+1}, which is the pair one vdpbf16ps lane takes.
// Scales and zeros [K/g, N/16, 2, 16] bf16: per group and block, 16 scales then 16 zeros (one 64-byte load).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <vector>

// Software prefetch this many 64-byte lines ahead of each block's stream (into L3/L2: _MM_HINT_T2). The blocks
// of a thread are adjacent in memory, so this runs ~16 KB ahead through the thread's share of the weight. On
// the EPYC (30 SmolLM2 layers, 1 row, int4 g32, medians of 15 interleaved): none 4.01 ms, 16 lines (T0) 3.64-3.97,
// 64 (T2) 3.63, 128 (T2) 3.38-3.54, 256 (T2) 3.29; a loads-only version of the same loop 2.5-2.7 ms.
constexpr int PREFETCH_LINES = 256;

#if defined(__AVX512BF16__)

static inline __m512 bf16x16_to_f32(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline void st(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
static inline void st(at::BFloat16* p, __m512 x) {  // round to nearest even, as c10::BFloat16 does (finite inputs)
  __m512i u = _mm512_castps_si512(x);
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
  _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
}

// p += w[k] * x[k] + w[k+1] * x[k+1] in 16 lanes, where each 32-bit lane of wv holds the bf16 pair (w[k], w[k+1]).
// bf16 x: one vdpbf16ps. fp32 x: the pair widened to two fp32 vectors (exact) and two FMAs, so an fp32 model
// keeps fp32 products.
static inline __m512 dot2(__m512 p, __m512i wv, const at::BFloat16* x) {
  return _mm512_dpbf16_ps(p, (__m512bh)wv, (__m512bh)_mm512_set1_epi32(*(const int32_t*)x));
}
static inline __m512 dot2(__m512 p, __m512i wv, const float* x) {
  const __m512 lo = _mm512_castsi512_ps(_mm512_slli_epi32(wv, 16));
  const __m512 hi = _mm512_castsi512_ps(_mm512_and_si512(wv, _mm512_set1_epi32((int)0xFFFF0000)));
  return _mm512_fmadd_ps(hi, _mm512_set1_ps(x[1]), _mm512_fmadd_ps(lo, _mm512_set1_ps(x[0]), p));
}

// NB output blocks of 16 rows × MT rows of x, over all of K. acc = sum over groups of s * P + z * sum(x in group).
template <int NB, int MT, typename T>
static inline void tile(const uint8_t* w, int64_t w_bs, const at::BFloat16* sz, int64_t sz_gs,
                        const T* x, int64_t x_rs, const float* sx, int64_t G, int64_t oct_per_group,
                        __m512i table, T* y, int64_t y_rs) {
  __m512 acc[NB][MT];
  for (int b = 0; b < NB; b++)
    for (int m = 0; m < MT; m++) acc[b][m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; g++) {
    __m512 p[NB][MT];
    for (int b = 0; b < NB; b++)
      for (int m = 0; m < MT; m++) p[b][m] = _mm512_setzero_ps();
    for (int64_t jo = 0; jo < oct_per_group; jo++) {
      const int64_t j = g * oct_per_group + jo;
      __m512i d[NB];
      for (int b = 0; b < NB; b++) {
        _mm_prefetch((const char*)(w + b * w_bs + (j + PREFETCH_LINES) * 64), _MM_HINT_T2);
        d[b] = _mm512_loadu_si512((const void*)(w + b * w_bs + j * 64));
      }
#pragma GCC unroll 4
      for (int pp = 0; pp < 4; pp++) {
        for (int b = 0; b < NB; b++) {
          // vpermw reads the low 5 bits of each half; the table repeats its 16 values so the 5th bit is ignored
          const __m512i wv = _mm512_permutexvar_epi16(_mm512_srli_epi32(d[b], 4 * pp), table);
          for (int m = 0; m < MT; m++) p[b][m] = dot2(p[b][m], wv, x + m * x_rs + j * 8 + 2 * pp);
        }
      }
    }
    for (int b = 0; b < NB; b++) {
      const __m512 s = bf16x16_to_f32(sz + g * sz_gs + b * 32), z = bf16x16_to_f32(sz + g * sz_gs + b * 32 + 16);
      for (int m = 0; m < MT; m++)
        acc[b][m] = _mm512_fmadd_ps(z, _mm512_set1_ps(sx[m * G + g]), _mm512_fmadd_ps(p[b][m], s, acc[b][m]));
    }
  }
  for (int b = 0; b < NB; b++)
    for (int m = 0; m < MT; m++) st(y + m * y_rs + b * 16, acc[b][m]);
}

// Blocks [b, b1) for all M rows: blocks in chunks of NB (then NB/2, ... for the rest), rows in chunks of MT
// (a chunk's codes stay in L1/L2 while the row chunks pass over them).
template <int NB, int MT, typename T>
static void blocks(int64_t b, int64_t b1, const uint8_t* w, int64_t w_bs, const at::BFloat16* sz, int64_t sz_gs,
                   const T* x, int64_t M, int64_t K, const float* sx, int64_t G, int64_t opg,
                   __m512i table, T* y, int64_t N) {
  for (; b + NB <= b1; b += NB) {
    int64_t m = 0;
    for (; m + MT <= M; m += MT)
      tile<NB, MT, T>(w + b * w_bs, w_bs, sz + b * 32, sz_gs, x + m * K, K, sx + m * G, G, opg, table, y + m * N + b * 16, N);
    for (; m < M; m++)
      tile<NB, 1, T>(w + b * w_bs, w_bs, sz + b * 32, sz_gs, x + m * K, K, sx + m * G, G, opg, table, y + m * N + b * 16, N);
  }
  if constexpr (NB > 1) blocks<NB / 2, MT, T>(b, b1, w, w_bs, sz, sz_gs, x, M, K, sx, G, opg, table, y, N);
}

template <typename T>
static void run(const at::Tensor& xt, const at::Tensor& codes, const at::Tensor& sz, int64_t groupsize, at::Tensor& y) {
  const int64_t M = xt.size(0), K = xt.size(1), N = y.size(1), NBLK = N / 16, G = K / groupsize;
  const T* x = xt.data_ptr<T>();
  // Per row and group, the sum of x: the zero term of every output in the group.
  std::vector<float> sx(M * G);
  for (int64_t m = 0; m < M; m++)
    for (int64_t g = 0; g < G; g++) {
      float s = 0.f;
      for (int64_t k = 0; k < groupsize; k++) s += static_cast<float>(x[m * K + g * groupsize + k]);
      sx[m * G + g] = s;
    }
  alignas(64) int16_t t[32];
  for (int i = 0; i < 32; i++) t[i] = c10::BFloat16(static_cast<float>((i & 15) - 8)).x;

  const __m512i table = _mm512_load_si512((const void*)t);
  const uint8_t* w = codes.data_ptr<uint8_t>();
  const int64_t w_bs = K / 2 * 16, sz_gs = NBLK * 32, opg = groupsize / 8;
  const at::BFloat16* s = sz.data_ptr<at::BFloat16>();
  T* yp = y.data_ptr<T>();
  auto work = [&](int64_t b0, int64_t b1) {
    if (M == 1) blocks<8, 1, T>(b0, b1, w, w_bs, s, sz_gs, x, M, K, sx.data(), G, opg, table, yp, N);
    else if (M < 4) blocks<4, 2, T>(b0, b1, w, w_bs, s, sz_gs, x, M, K, sx.data(), G, opg, table, yp, N);
    else blocks<2, 4, T>(b0, b1, w, w_bs, s, sz_gs, x, M, K, sx.data(), G, opg, table, yp, N);
  };
  at::parallel_for(0, NBLK, 1, work);
}

#endif

// x [M, K] float32 or bfloat16, codes and sz packed by quantize.pack_int4_for_eaglet_cpu → y [M, N] in x's dtype.
at::Tensor int4_mm(at::Tensor x, at::Tensor codes, at::Tensor sz, int64_t groupsize) {
#if defined(__AVX512BF16__)
  TORCH_CHECK(x.dim() == 2 && codes.dim() == 4 && codes.size(2) == 16 && codes.size(3) == 4 &&
              codes.scalar_type() == at::kByte, "int4_mm: codes must be uint8 [N/16, K/8, 16, 4] (quantize.pack_int4_for_eaglet_cpu)");
  const int64_t M = x.size(0), K = x.size(1), N = codes.size(0) * 16;
  TORCH_CHECK(codes.size(1) * 8 == K && groupsize % 8 == 0 && K % groupsize == 0,
              "int4_mm: x has ", K, " columns, codes ", codes.size(1) * 8, ", group size ", groupsize);
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.dim() == 4 && sz.size(0) == K / groupsize &&
              sz.size(1) == N / 16 && sz.size(2) == 2 && sz.size(3) == 16, "int4_mm: scales/zeros [K/g, N/16, 2, 16] bf16");
  TORCH_CHECK(codes.is_contiguous() && sz.is_contiguous(), "int4_mm: packed tensors must be contiguous");
  x = x.contiguous();
  auto y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  switch (x.scalar_type()) {
    case at::kBFloat16: run<at::BFloat16>(x, codes, sz, groupsize, y); break;
    case at::kFloat: run<float>(x, codes, sz, groupsize, y); break;
    default: TORCH_CHECK(false, "int4_mm: x must be float32 or bfloat16");
  }
  return y;
#else
  TORCH_CHECK(false, "int4_mm: built without AVX512-BF16");
#endif
}

TORCH_LIBRARY_FRAGMENT(eaglet, m) { m.def("int4_mm(Tensor x, Tensor codes, Tensor sz, int groupsize) -> Tensor"); }
TORCH_LIBRARY_IMPL(eaglet, CPU, m) { m.impl("int4_mm", &int4_mm); }
