// LoraAdd (domain "olivepress"): out = y + (x @ A) @ B, one LoRA branch in one CUDA kernel.
//
// Why: at batch-1 decoding on a GPU every dependent kernel costs ~4 µs however little it reads, and the
// export's branch is three of them (MatMul by A, MatMul by B, Add; benchmarks/lora_branch_forms.py). This
// operator does the branch in one: every thread block recomputes the rank-r product x @ A for its rows
// (A is small and stays in L2), then adds its slice of (x @ A) @ B to y. A and B keep being graph inputs,
// so an .onnx_adapter file still switches them at run time.
//
// Inputs: y [..., N] (the int4 product), x [..., K] (its input), A [K, r], B [r, N], all float16; r may be
// 0 (no adapter active: out = y). Output: out, shaped as y. Built against ONNX Runtime's C API header only
// (no link to onnxruntime): the library's RegisterCustomOps receives the API from the session.

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <string>
#include <vector>

#include "onnxruntime_c_api.h"

namespace {

constexpr int kThreads = 256;      // threads per block; each writes one output column
constexpr int kRankChunk = 16;     // ranks accumulated in registers at a time
constexpr int kWarps = kThreads / 32;

const OrtApi* g_api = nullptr;

__device__ float warp_sum(float value) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  return value;
}

// The kernel for a rank the library was compiled for (R a multiple of 8; A's rows 16-byte aligned). B's
// column and y are loaded first: they do not depend on x @ A, so their latency hides behind it. A's rows
// are read 16 bytes at a time, and every loop is unrolled so that the loads are in flight together.
// grid: (ceil(N / kThreads), M)
template <int R>
__global__ void lora_add_fixed_rank(const half* __restrict__ y, const half* __restrict__ x,
                                    const half* __restrict__ a, const half* __restrict__ b,
                                    half* __restrict__ out, int k, int n) {
  __shared__ float partial[kWarps][R];
  __shared__ float xa[R];
  const int row = blockIdx.y;
  const int tid = threadIdx.x;
  const int column = blockIdx.x * kThreads + tid;
  const bool writes = column < n;
  const int64_t at = static_cast<int64_t>(row) * n + column;

  float b_column[R];
#pragma unroll
  for (int j = 0; j < R; ++j) b_column[j] = writes ? __half2float(b[static_cast<int64_t>(j) * n + column]) : 0.f;
  const float y_value = writes ? __half2float(y[at]) : 0.f;

  float sums[R];
#pragma unroll
  for (int j = 0; j < R; ++j) sums[j] = 0.f;
  const half* x_row = x + static_cast<int64_t>(row) * k;
#pragma unroll 4
  for (int i = tid; i < k; i += kThreads) {
    const float xi = __half2float(x_row[i]);
    const uint4* a_row = reinterpret_cast<const uint4*>(a + static_cast<int64_t>(i) * R);
#pragma unroll
    for (int v = 0; v < R / 8; ++v) {
      const uint4 packed = a_row[v];
      const half2* pairs = reinterpret_cast<const half2*>(&packed);
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        const float2 values = __half22float2(pairs[p]);
        sums[v * 8 + 2 * p] += xi * values.x;
        sums[v * 8 + 2 * p + 1] += xi * values.y;
      }
    }
  }
#pragma unroll
  for (int j = 0; j < R; ++j) {
    const float total = warp_sum(sums[j]);
    if (tid % 32 == 0) partial[tid / 32][j] = total;
  }
  __syncthreads();
  if (tid < R) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += partial[w][tid];
    xa[tid] = total;
  }
  __syncthreads();
  if (!writes) return;
  float delta = 0.f;
#pragma unroll
  for (int j = 0; j < R; ++j) delta += xa[j] * b_column[j];
  out[at] = __float2half(y_value + delta);
}

// Any other rank (0 included: out = y): x @ A in chunks of kRankChunk ranks, r floats of shared memory.
__global__ void lora_add_kernel(const half* __restrict__ y, const half* __restrict__ x,
                                const half* __restrict__ a, const half* __restrict__ b,
                                half* __restrict__ out, int k, int n, int r) {
  extern __shared__ float xa[];
  __shared__ float partial[kWarps][kRankChunk];
  const int row = blockIdx.y;
  const int tid = threadIdx.x;
  const half* x_row = x + static_cast<int64_t>(row) * k;

  for (int first = 0; first < r; first += kRankChunk) {
    float sums[kRankChunk];
#pragma unroll
    for (int j = 0; j < kRankChunk; ++j) sums[j] = 0.f;
    for (int i = tid; i < k; i += kThreads) {
      const float xi = __half2float(x_row[i]);
      const half* a_row = a + static_cast<int64_t>(i) * r + first;
#pragma unroll
      for (int j = 0; j < kRankChunk; ++j) {
        if (first + j < r) sums[j] += xi * __half2float(a_row[j]);
      }
    }
#pragma unroll
    for (int j = 0; j < kRankChunk; ++j) {
      const float total = warp_sum(sums[j]);
      if (tid % 32 == 0) partial[tid / 32][j] = total;
    }
    __syncthreads();
    if (tid < kRankChunk && first + tid < r) {
      float total = 0.f;
      for (int w = 0; w < kWarps; ++w) total += partial[w][tid];
      xa[first + tid] = total;
    }
    __syncthreads();
  }

  const int column = blockIdx.x * kThreads + tid;
  if (column >= n) return;
  float delta = 0.f;
  for (int j = 0; j < r; ++j) delta += xa[j] * __half2float(b[static_cast<int64_t>(j) * n + column]);
  const int64_t at = static_cast<int64_t>(row) * n + column;
  out[at] = __float2half(__half2float(y[at]) + delta);
}

#define RETURN_IF_ERROR(expr)            \
  do {                                   \
    OrtStatus* _status = (expr);         \
    if (_status != nullptr) return _status; \
  } while (0)

OrtStatus* Fail(const std::string& message) { return g_api->CreateStatus(ORT_INVALID_ARGUMENT, message.c_str()); }

OrtStatus* ShapeOf(const OrtValue* value, std::vector<int64_t>& shape, ONNXTensorElementDataType& type) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  RETURN_IF_ERROR(g_api->GetTensorTypeAndShape(value, &info));
  size_t count = 0;
  OrtStatus* status = g_api->GetTensorElementType(info, &type);
  if (status == nullptr) status = g_api->GetDimensionsCount(info, &count);
  if (status == nullptr) {
    shape.resize(count);
    status = g_api->GetDimensions(info, shape.data(), count);
  }
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  return status;
}

OrtStatus* ORT_API_CALL Compute(void* /*kernel*/, OrtKernelContext* context) {
  const OrtValue* inputs[4];
  std::vector<int64_t> shapes[4];
  for (size_t i = 0; i < 4; ++i) {
    RETURN_IF_ERROR(g_api->KernelContext_GetInput(context, i, &inputs[i]));
    ONNXTensorElementDataType type;
    RETURN_IF_ERROR(ShapeOf(inputs[i], shapes[i], type));
    if (type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) return Fail("LoraAdd takes float16 tensors");
  }
  const auto& y_shape = shapes[0];
  const auto& x_shape = shapes[1];
  if (y_shape.empty() || x_shape.size() != y_shape.size() || shapes[2].size() != 2 || shapes[3].size() != 2)
    return Fail("LoraAdd: y and x must have the same rank, A and B two dimensions");
  const int64_t n = y_shape.back(), k = x_shape.back(), r = shapes[2][1];
  if (shapes[2][0] != k || shapes[3][0] != r || shapes[3][1] != n)
    return Fail("LoraAdd: A must be [K, r] and B [r, N] for x [..., K] and y [..., N]");
  int64_t rows = 1;
  for (size_t d = 0; d + 1 < y_shape.size(); ++d) {
    if (y_shape[d] != x_shape[d]) return Fail("LoraAdd: y and x differ in a leading dimension");
    rows *= y_shape[d];
  }
  if (n > INT_MAX || k > INT_MAX || rows > 65535) return Fail("LoraAdd: tensor too large");

  OrtValue* output = nullptr;
  RETURN_IF_ERROR(g_api->KernelContext_GetOutput(context, 0, y_shape.data(), y_shape.size(), &output));
  if (rows == 0 || n == 0) return nullptr;
  void* data[5];
  for (int i = 0; i < 4; ++i) RETURN_IF_ERROR(g_api->GetTensorMutableData(const_cast<OrtValue*>(inputs[i]), &data[i]));
  RETURN_IF_ERROR(g_api->GetTensorMutableData(output, &data[4]));
  void* stream = nullptr;
  RETURN_IF_ERROR(g_api->KernelContext_GetGPUComputeStream(context, &stream));

  const dim3 grid(static_cast<unsigned>((n + kThreads - 1) / kThreads), static_cast<unsigned>(rows));
  const auto on = static_cast<cudaStream_t>(stream);
  const auto* y = static_cast<const half*>(data[0]);
  const auto* x = static_cast<const half*>(data[1]);
  const auto* a = static_cast<const half*>(data[2]);
  const auto* b = static_cast<const half*>(data[3]);
  auto* out = static_cast<half*>(data[4]);
  const int k32 = static_cast<int>(k), n32 = static_cast<int>(n);
  const bool aligned = reinterpret_cast<uintptr_t>(a) % 16 == 0;
  switch (aligned ? r : -1) {
    case 8: lora_add_fixed_rank<8><<<grid, kThreads, 0, on>>>(y, x, a, b, out, k32, n32); break;
    case 16: lora_add_fixed_rank<16><<<grid, kThreads, 0, on>>>(y, x, a, b, out, k32, n32); break;
    case 32: lora_add_fixed_rank<32><<<grid, kThreads, 0, on>>>(y, x, a, b, out, k32, n32); break;
    case 48: lora_add_fixed_rank<48><<<grid, kThreads, 0, on>>>(y, x, a, b, out, k32, n32); break;
    case 64: lora_add_fixed_rank<64><<<grid, kThreads, 0, on>>>(y, x, a, b, out, k32, n32); break;
    default:
      lora_add_kernel<<<grid, kThreads, r * sizeof(float), on>>>(y, x, a, b, out, k32, n32, static_cast<int>(r));
  }
  const cudaError_t launched = cudaGetLastError();
  if (launched != cudaSuccess) return g_api->CreateStatus(ORT_FAIL, cudaGetErrorString(launched));
  return nullptr;
}

OrtStatus* ORT_API_CALL CreateKernel(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*, void** kernel) {
  *kernel = reinterpret_cast<void*>(1);  // stateless: every shape is read at compute time
  return nullptr;
}

OrtStatus* ORT_API_CALL InferShape(const OrtCustomOp*, OrtShapeInferContext* context) {
  OrtTensorTypeAndShapeInfo* info = nullptr;  // the context's own: not released here
  RETURN_IF_ERROR(g_api->ShapeInferContext_GetInputTypeShape(context, 0, &info));
  return g_api->ShapeInferContext_SetOutputTypeShape(context, 0, info);
}

OrtCustomOp MakeOp() {
  OrtCustomOp op{};
  op.version = ORT_API_VERSION;
  op.GetName = [](const OrtCustomOp*) { return "LoraAdd"; };
  op.GetExecutionProviderType = [](const OrtCustomOp*) { return "CUDAExecutionProvider"; };
  op.GetInputType = [](const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16; };
  op.GetInputTypeCount = [](const OrtCustomOp*) -> size_t { return 4; };
  op.GetOutputType = [](const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16; };
  op.GetOutputTypeCount = [](const OrtCustomOp*) -> size_t { return 1; };
  op.KernelDestroy = [](void*) {};
  op.GetInputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
  op.GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
  op.GetInputMemoryType = [](const OrtCustomOp*, size_t) { return OrtMemTypeDefault; };
  op.GetVariadicInputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicInputHomogeneity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicOutputMinArity = [](const OrtCustomOp*) { return 1; };
  op.GetVariadicOutputHomogeneity = [](const OrtCustomOp*) { return 1; };
  op.CreateKernelV2 = CreateKernel;
  op.KernelComputeV2 = Compute;
  op.InferOutputShapeFn = InferShape;
  op.GetStartVersion = [](const OrtCustomOp*) { return 1; };
  op.GetEndVersion = [](const OrtCustomOp*) { return INT_MAX; };
  op.GetMayInplace = [](int**, int**) -> size_t { return 0; };
  op.ReleaseMayInplace = [](int*, int*) {};
  op.GetAliasMap = [](int**, int**) -> size_t { return 0; };
  op.ReleaseAliasMap = [](int*, int*) {};
  return op;
}

OrtCustomOp g_lora_add = MakeOp();

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  g_api = api_base->GetApi(ORT_API_VERSION);
  if (g_api == nullptr) return nullptr;  // an onnxruntime older than this header: nothing registered
  OrtCustomOpDomain* domain = nullptr;
  RETURN_IF_ERROR(g_api->CreateCustomOpDomain("olivepress", &domain));
  RETURN_IF_ERROR(g_api->CustomOpDomain_Add(domain, &g_lora_add));
  return g_api->AddCustomOpDomain(options, domain);
}
