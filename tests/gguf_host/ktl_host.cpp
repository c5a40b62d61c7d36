// Host build of KLinearGGUF's block decoding (overlays/gguf_linear/ktlegacy_gguf.cuh) for
// tests/test_gguf_linear.py: the same chunk functions the CUDA kernels call, compiled with g++.
#include "ktlegacy_gguf.cuh"

namespace {

// What dequant_kernel writes: every chunk's eight values at their two runs of four.
template <int T>
void dequant(const uint8_t* w, long long blocks, float* out) {
  using B = ktl::Blk<T>;
  for (long long b = 0; b < blocks; ++b)
    for (int c = 0; c < B::QK / 8; ++c) {
      float v[8];
      int o0, o1;
      B::chunk(w + b * B::BYTES, c, v, o0, o1);
      for (int i = 0; i < 4; ++i) {
        out[b * B::QK + o0 + i] = v[i];
        out[b * B::QK + o1 + i] = v[4 + i];
      }
    }
}

// What one warp of matvec_kernel sums for one weight row: lane l takes chunks l, l+32, ...,
// each lane's partial sum in float, then the 32 partial sums are added (a butterfly on the GPU).
template <int T>
float rowdot(const uint8_t* row, int k, const float* x) {
  using B = ktl::Blk<T>;
  const int per_block = B::QK / 8, chunks = k / B::QK * per_block;
  float lanes[32] = {0};
  for (int lane = 0; lane < 32; ++lane)
    for (int c = lane; c < chunks; c += 32) {
      const int blk = c / per_block;
      float v[8];
      int o0, o1;
      B::chunk(row + blk * B::BYTES, c % per_block, v, o0, o1);
      for (int i = 0; i < 4; ++i) {
        lanes[lane] += v[i] * x[blk * B::QK + o0 + i];
        lanes[lane] += v[4 + i] * x[blk * B::QK + o1 + i];
      }
    }
  float s = 0.f;
  for (int lane = 0; lane < 32; ++lane) s += lanes[lane];
  return s;
}

}  // namespace

extern "C" {

int ktl_values_per_block(int type) { return ktl::values_per_block(type); }
int ktl_bytes_per_block(int type) { return ktl::bytes_per_block(type); }

int ktl_dequant(int type, const uint8_t* w, long long blocks, float* out) {
#define KTL_CASE(T) if (type == ktl::T) { dequant<ktl::T>(w, blocks, out); return 0; }
  KTL_GGUF_TYPES(KTL_CASE)
#undef KTL_CASE
  return -1;
}

int ktl_matvec(int type, const uint8_t* w, int n, int k, const float* x, float* y) {
  const int row_bytes = k / ktl::values_per_block(type) * ktl::bytes_per_block(type);
#define KTL_CASE(T)                                                           \
  if (type == ktl::T) {                                                       \
    for (int r = 0; r < n; ++r) y[r] = rowdot<ktl::T>(w + (long long)r * row_bytes, k, x); \
    return 0;                                                                 \
  }
  KTL_GGUF_TYPES(KTL_CASE)
#undef KTL_CASE
  return -1;
}
}
