// ktlegacy: linear layers computed from GGUF weight blocks kept on the GPU (sm_70 and up).
//
// Two operations for ktransformers' KLinearGGUF operator (ktlegacy_gguf_linear.py):
//   matvec(w, type, n, k, x, y)            y[r] = W x[r] for 1-4 rows r (decode): each warp reads one
//                                          weight row's blocks once, decodes them in registers and
//                                          accumulates in fp32; bandwidth-bound, no scratch
//   dequantize(w, type, n, k, row0, rows, out)   rows row0..row0+rows-1 of W into `out` (fp16 or
//                                          fp32), the prefill path's reused scratch before a GEMM
// Both run on the caller's current CUDA stream and allocate nothing, so CUDA-graph capture works.
// The block decoding lives in ktlegacy_gguf.cuh (shared with the host-side test). Written by
// ktlegacy; built by the patched tree's setup.py as the extension `ktlegacy_gguf_ops`.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "ktlegacy_gguf.cuh"

namespace {

constexpr int kMaxRows = 4;         // matvec handles up to this many input rows (facts.GPU_LINEAR_MATVEC_MAX_ROWS)
constexpr int kWarpsPerBlock = 4;   // matvec: one weight row per warp
constexpr int kDequantThreads = 256;

__device__ __forceinline__ void load4(const half* p, float* f) {
  const uint2 raw = *reinterpret_cast<const uint2*>(p);  // 4 halves, 8-byte aligned (offsets are multiples of 4)
  const half2 a = *reinterpret_cast<const half2*>(&raw.x), b = *reinterpret_cast<const half2*>(&raw.y);
  const float2 fa = __half22float2(a), fb = __half22float2(b);
  f[0] = fa.x; f[1] = fa.y; f[2] = fb.x; f[3] = fb.y;
}

__device__ __forceinline__ void load4(const float* p, float* f) {
  const float4 raw = *reinterpret_cast<const float4*>(p);
  f[0] = raw.x; f[1] = raw.y; f[2] = raw.z; f[3] = raw.w;
}

__device__ __forceinline__ void store4(half* p, const float* f) {
  half2 a = __floats2half2_rn(f[0], f[1]), b = __floats2half2_rn(f[2], f[3]);
  uint2 raw;
  raw.x = *reinterpret_cast<const unsigned int*>(&a);
  raw.y = *reinterpret_cast<const unsigned int*>(&b);
  *reinterpret_cast<uint2*>(p) = raw;
}

__device__ __forceinline__ void store4(float* p, const float* f) {
  *reinterpret_cast<float4*>(p) = make_float4(f[0], f[1], f[2], f[3]);
}

__device__ __forceinline__ void store1(half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store1(float* p, float v) { *p = v; }

// y[r * n + row] = sum_k W[row, k] * x[r * k + k'] for r < R; one warp per weight row.
template <int T, int R, typename scalar_t>
__global__ void matvec_kernel(const uint8_t* __restrict__ w, const scalar_t* __restrict__ x,
                              scalar_t* __restrict__ y, int n, int k) {
  using B = ktl::Blk<T>;
  constexpr int kChunks = B::QK / 8;
  const int row = blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= n) return;  // the whole warp leaves together: row is uniform across its lanes
  const int blocks = k / B::QK;
  const uint8_t* wrow = w + (size_t)row * blocks * B::BYTES;
  float acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.f;
  for (int c = lane; c < blocks * kChunks; c += 32) {
    const int blk = c / kChunks;
    float v[8], xa[4], xb[4];
    int o0, o1;
    B::chunk(wrow + (size_t)blk * B::BYTES, c % kChunks, v, o0, o1);
    const int base = blk * B::QK;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const scalar_t* xr = x + (size_t)r * k + base;
      load4(xr + o0, xa);
      load4(xr + o1, xb);
      float s = acc[r];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        s = fmaf(v[i], xa[i], s);
        s = fmaf(v[4 + i], xb[i], s);
      }
      acc[r] = s;
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float s = acc[r];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) store1(y + (size_t)r * n + row, s);
  }
}

// out[(row - row0) * k + i] = W[row, i] for row0 <= row < row0 + rows; one thread per chunk of 8.
template <int T, typename scalar_t>
__global__ void dequant_kernel(const uint8_t* __restrict__ w, scalar_t* __restrict__ out, int k,
                               long long row0, long long chunks) {
  using B = ktl::Blk<T>;
  constexpr int kChunks = B::QK / 8;
  const long long blocks_per_row = k / B::QK;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < chunks;
       i += (long long)gridDim.x * blockDim.x) {
    const long long blk = i / kChunks;  // block index within the selected rows
    float v[8];
    int o0, o1;
    B::chunk(w + (size_t)(row0 * blocks_per_row + blk) * B::BYTES, (int)(i % kChunks), v, o0, o1);
    scalar_t* dst = out + (size_t)blk * B::QK;
    store4(dst + o0, v);
    store4(dst + o1, v + 4);
  }
}

template <int T, typename scalar_t>
void launch_matvec(const uint8_t* w, const scalar_t* x, scalar_t* y, int n, int k, int rows, cudaStream_t stream) {
  const dim3 grid((n + kWarpsPerBlock - 1) / kWarpsPerBlock), block(32 * kWarpsPerBlock);
  switch (rows) {
#define KTL_ROWS(R) case R: matvec_kernel<T, R, scalar_t><<<grid, block, 0, stream>>>(w, x, y, n, k); break;
    KTL_ROWS(1) KTL_ROWS(2) KTL_ROWS(3) KTL_ROWS(4)
#undef KTL_ROWS
    default: TORCH_CHECK(false, "ktlegacy_gguf_ops.matvec: ", rows, " rows (at most ", kMaxRows, ")");
  }
}

template <int T, typename scalar_t>
void launch_dequant(const uint8_t* w, scalar_t* out, int k, long long row0, long long rows, cudaStream_t stream) {
  const long long chunks = rows * (k / ktl::Blk<T>::QK) * (ktl::Blk<T>::QK / 8);
  if (chunks == 0) return;
  const long long want = (chunks + kDequantThreads - 1) / kDequantThreads;
  const int grid = (int)std::min<long long>(want, 65535LL * 8);
  dequant_kernel<T, scalar_t><<<grid, kDequantThreads, 0, stream>>>(w, out, k, row0, chunks);
}

void check_weight(const torch::Tensor& w, int64_t type, int64_t n, int64_t k, const char* op) {
  TORCH_CHECK(w.is_cuda() && w.scalar_type() == torch::kUInt8 && w.is_contiguous(),
              "ktlegacy_gguf_ops.", op, ": the weight must be a contiguous uint8 CUDA tensor of GGUF blocks");
  const int qk = ktl::values_per_block((int)type);
  TORCH_CHECK(qk > 0, "ktlegacy_gguf_ops.", op, ": ggml type ", type, " is not supported");
  TORCH_CHECK(n > 0 && k > 0 && k % qk == 0, "ktlegacy_gguf_ops.", op, ": a row of ", k,
              " values is not a whole number of ", qk, "-value blocks");
  TORCH_CHECK(w.numel() == n * (k / qk) * ktl::bytes_per_block((int)type), "ktlegacy_gguf_ops.", op,
              ": ", w.numel(), " bytes are not ", n, " rows of ", k, " values of ggml type ", type);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(w.data_ptr()) % 4 == 0, "ktlegacy_gguf_ops.", op,
              ": the weight must start 4-byte aligned");
}

}  // namespace

void matvec(torch::Tensor w, int64_t type, int64_t n, int64_t k, torch::Tensor x, torch::Tensor y) {
  check_weight(w, type, n, k, "matvec");
  TORCH_CHECK(x.device() == w.device() && y.device() == w.device(), "ktlegacy_gguf_ops.matvec: x, y and the weight must share a device");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k && x.is_contiguous(), "ktlegacy_gguf_ops.matvec: x must be contiguous (rows, ", k, ")");
  TORCH_CHECK(y.dim() == 2 && y.size(0) == x.size(0) && y.size(1) == n && y.is_contiguous(),
              "ktlegacy_gguf_ops.matvec: y must be contiguous (rows, ", n, ")");
  TORCH_CHECK(x.scalar_type() == y.scalar_type() && (x.scalar_type() == torch::kHalf || x.scalar_type() == torch::kFloat),
              "ktlegacy_gguf_ops.matvec: x and y must both be float16 or both float32");
  const int rows = (int)x.size(0);
  TORCH_CHECK(rows >= 1 && rows <= kMaxRows, "ktlegacy_gguf_ops.matvec: ", rows, " rows (1 to ", kMaxRows, ")");
  const at::cuda::OptionalCUDAGuard guard(w.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  bool done = false;
#define KTL_MV(T)                                                                                              \
  if (!done && type == ktl::T) {                                                                              \
    if (x.scalar_type() == torch::kHalf)                                                                      \
      launch_matvec<ktl::T, half>(wp, reinterpret_cast<const half*>(x.data_ptr<at::Half>()),                  \
                                  reinterpret_cast<half*>(y.data_ptr<at::Half>()), (int)n, (int)k, rows, stream); \
    else                                                                                                      \
      launch_matvec<ktl::T, float>(wp, x.data_ptr<float>(), y.data_ptr<float>(), (int)n, (int)k, rows, stream); \
    done = true;                                                                                              \
  }
  KTL_GGUF_TYPES(KTL_MV)
#undef KTL_MV
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void dequantize(torch::Tensor w, int64_t type, int64_t n, int64_t k, int64_t row0, int64_t rows, torch::Tensor out) {
  check_weight(w, type, n, k, "dequantize");
  TORCH_CHECK(row0 >= 0 && rows >= 0 && row0 + rows <= n, "ktlegacy_gguf_ops.dequantize: rows ", row0, "..",
              row0 + rows, " are not inside the weight's ", n);
  TORCH_CHECK(out.device() == w.device() && out.is_contiguous() && out.numel() >= rows * k &&
                  (out.scalar_type() == torch::kHalf || out.scalar_type() == torch::kFloat),
              "ktlegacy_gguf_ops.dequantize: out must be a contiguous float16/float32 tensor on the weight's device "
              "with room for ", rows, " x ", k, " values");
  const at::cuda::OptionalCUDAGuard guard(w.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  bool done = false;
#define KTL_DQ(T)                                                                                              \
  if (!done && type == ktl::T) {                                                                              \
    if (out.scalar_type() == torch::kHalf)                                                                    \
      launch_dequant<ktl::T, half>(wp, reinterpret_cast<half*>(out.data_ptr<at::Half>()), (int)k, row0, rows, stream); \
    else                                                                                                      \
      launch_dequant<ktl::T, float>(wp, out.data_ptr<float>(), (int)k, row0, rows, stream);                   \
    done = true;                                                                                              \
  }
  KTL_GGUF_TYPES(KTL_DQ)
#undef KTL_DQ
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::vector<int64_t> supported_types() {
  std::vector<int64_t> out;
#define KTL_ID(T) out.push_back(ktl::T);
  KTL_GGUF_TYPES(KTL_ID)
#undef KTL_ID
  return out;
}

std::vector<int64_t> block_layout(int64_t type) {
  return {ktl::values_per_block((int)type), ktl::bytes_per_block((int)type)};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ktlegacy: linear layers from GGUF blocks on the GPU (sm_70+)";
  m.def("matvec", &matvec, "y = x @ W.T for 1-4 rows of x, W as GGUF blocks", py::arg("w"), py::arg("type"),
        py::arg("n"), py::arg("k"), py::arg("x"), py::arg("y"));
  m.def("dequantize", &dequantize, "rows row0..row0+rows of W (GGUF blocks) into out", py::arg("w"),
        py::arg("type"), py::arg("n"), py::arg("k"), py::arg("row0"), py::arg("rows"), py::arg("out"));
  m.def("supported_types", &supported_types, "ggml type ids this build decodes");
  m.def("block_layout", &block_layout, "(values, bytes) per block of a ggml type; (0, 0) if not decoded", py::arg("type"));
  m.attr("max_rows") = kMaxRows;
}
