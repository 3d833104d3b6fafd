// LoraAdd (domain "olivepress"): out_i = y_i + (x @ A) @ B_i for one to three (y_i, B_i) pairs that share x
// and A, in one CUDA kernel.
//
// Why: at batch-1 decoding on a GPU every dependent kernel costs microseconds however little it reads, and
// the export's branch is three of them (MatMul by A, MatMul by B, Add; benchmarks/lora_branch_forms.py).
// This operator does the branch in one launch, and the branches of linears that read the same x (q, k and v;
// gate and up), whose A matrices the export concatenates into the group's A, in one launch too: x @ A once,
// then every pair's columns. A and B stay graph inputs, so an .onnx_adapter file still switches them at run
// time (r may change from one run to the next).
//
// Inputs, in order: y1, x, A, B1, then optionally y2, B2, then y3, B3 (a node lists 4, 6 or 8 inputs and
// 1, 2 or 3 outputs: out1, out2, out3; never "" for a skipped one, which ONNX Runtime's shape inference of
// custom ops cannot take). y_i [..., N_i] (pair i's int4 product), x [..., K] (their input), with the same
// leading dimensions; A [K, r]; B_i [r, N_i]; all float16. N_i may differ. r may be 0 (no adapter active:
// out_i = y_i). out_i is shaped as y_i. The pairs are those whose y and B are both present, from the first
// on; one without the other, a pair after a missing one, or outputs not one per pair is an error. Nodes of
// one pair are the operator as it was before pairs (inputs y, x, A, B; output out). "rows" below is the
// product of the leading dimensions (1 when decoding one token, the prompt's length when prefilling). Built
// against ONNX Runtime's C API header only (no link to onnxruntime): the library's RegisterCustomOps
// receives the API from the session.
//
// Every kernel below takes the pairs as one Pairs argument and walks column tiles of 256 columns over all
// pairs' columns, pair after pair (a tile never spans two outputs: pair i has ceil(N_i / 256) of them).
//
// The kernels (256 threads a block; every sum in fp32):
//
// * lora_add_split<R, MR> (rows <= kMaxSplitRows, a compiled rank R in kFixedRanks: 8, 16, 24, 32, 48,
//   64; A 16-byte aligned): the decode kernel. A kernel where every block recomputed x @ A over all of A (up
//   to 256 KB, for down_proj) was bound by one SM's bandwidth from L2 (9.6 us a branch on an H100). Here the
//   G blocks share that product: phase 1, block b reads A's rows in passes b, b + G, ... (A as a flat array
//   of 16-byte words, consecutive threads on consecutive words), sums them in the block and adds its
//   [rows, r] part into a global fp32 scratch xa with atomicAdd; then a grid-wide barrier; phase 2, every
//   block adds its column tiles of xa @ B_i to y_i, over every pair's tiles. With one row, B's column and
//   y of the block's first tile are loaded before phase 1: they do not depend on x @ A.
//   The barrier and xa live in a SplitState that belongs to one node (the kernel object CreateKernel
//   returns) and one CUDA stream (launches on one stream never overlap; concurrent runs of a session on
//   different streams get different states). It is made on the first run on that stream (cudaMalloc, then
//   cudaMemsetAsync on that stream) and survives CUDA-graph replay because the kernel keeps its own
//   invariant (kernel arguments are frozen at capture: nothing can count launches for it): arrived is 0
//   between launches; a launch reads generation g at its start and accumulates into xa[g & 1], the other
//   buffer being zero; the last block to arrive zeroes xa[(g & 1) ^ 1] for the next launch, resets arrived
//   and publishes g + 1, which releases the others (the next launch on the stream starts only after every
//   block of this one has read xa[g & 1]).
//   A spin barrier deadlocks unless every block is resident at once, so G is at most the number of SMs
//   and at most what cudaOccupancyMaxActiveBlocksPerMultiprocessor allows (blocks loop over column tiles
//   when the pairs' N need more); when the occupancy is 0, or no state could be made (a stream first seen
//   while it is being captured), lora_add_rows runs instead. Set OLIVEPRESS_LORA_ADD_SPLIT=0 (read when the session
//   makes the kernel) to always run it: where another client may hold SMs for as long as it likes (MPS with
//   a share of the SMs that the device properties do not report, MIG set up oddly), or where several
//   spin-barrier kernels may run at once (concurrent runs on one GPU: each grid fits alone, but two whose
//   blocks hold each other's SMs wait forever; at rank 64 a block takes a whole SM's registers).
// * lora_add_rows<R, MR> (more rows, or the split off): grid (column splits, ceil(rows / MR)); each block
//   computes x @ A for its MR rows over all of A (the same coalesced loads), then loops over its column
//   tiles. Prefill runs it once per prompt; A is read once per MR rows and per column split.
// * lora_add_any_rank (any other r, 0 included, or A not 16-byte aligned): one row and one column tile a
//   block, x @ A in chunks of 8 ranks with 2-byte loads, then the tile's columns.
// All three sum a block's partial products with block_sum.
//
// OLIVEPRESS_LORA_ADD_TRACE=1 (read when the session makes the kernel) prints every launch's choice to
// stderr ("n 3072+1024+1024": each pair's N), for tests and benchmarks that need to know which kernel ran.

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "onnxruntime_c_api.h"

namespace {

constexpr int kThreads = 256;  // threads per block; in phase 2 each writes one output column
constexpr int kWarps = kThreads / 32;
constexpr int kMaxSplitRows = 4;      // rows up to which lora_add_split runs
constexpr int kMaxFixedRank = 64;     // the largest compiled rank
constexpr int kRowBlock = 4;          // rows a lora_add_rows block handles when there are several
constexpr int kPassesPerBlock = 2;    // passes over A a split block aims at (fewer blocks, fewer atomics)
constexpr int kAnyRankChunk = 8;      // ranks lora_add_any_rank sums at a time
constexpr int kMaxAnyRank = 12288;    // its xa is r floats of shared memory (48 KB)
constexpr int kMaxPairs = 3;          // (y, B) pairs of one node, sharing x and A

const OrtApi* g_api = nullptr;

// The barrier and scratch of one node's lora_add_split on one stream (see the header).
struct SplitState {
  unsigned int arrived;
  unsigned int generation;
  float xa[2][kMaxSplitRows * kMaxFixedRank];  // [parity][row * r + rank]
};
static_assert(kMaxSplitRows * kMaxFixedRank == kThreads, "the last block zeroes one xa buffer, a float a thread");

__host__ __device__ constexpr int pow2_at_least(int value) {
  return value <= 1 ? 1 : 2 * pow2_at_least((value + 1) / 2);
}

// Sums COUNT values per thread over a block's threads. Layout: within each warp, lane = p * V + v, with p
// below W = 32 / V (an A row among the warp's W) and v below V (the thread's slice); lanes from W * V on hold
// nothing (r = 24, 40, 48, 56). result[v * COUNT + e] is the sum of value e over the block's threads of
// slice v. The warp's W rows are summed with a shuffle tree whose steps are multiples of V (so lanes of one
// slice meet) and bounded by W, then the warps through shared memory. Ends with the block synchronized.
template <int V, int COUNT>
__device__ __forceinline__ void block_sum(float (&values)[COUNT], float (&partial)[kWarps][V * COUNT],
                                          float (&result)[V * COUNT]) {
  constexpr int W = 32 / V;
  constexpr int kTop = pow2_at_least(W) / 2;
  const int lane = threadIdx.x % 32;
  const int p = lane / V;
#pragma unroll
  for (int step = kTop; step > 0; step /= 2) {
#pragma unroll
    for (int e = 0; e < COUNT; ++e) {
      const float other = __shfl_down_sync(0xffffffffu, values[e], step * V);
      if (p + step < W) values[e] += other;  // lane + step * V is then a lane of the same slice
    }
  }
  if (lane < V) {
#pragma unroll
    for (int e = 0; e < COUNT; ++e) partial[threadIdx.x / 32][lane * COUNT + e] = values[e];
  }
  __syncthreads();
  for (int slot = threadIdx.x; slot < V * COUNT; slot += kThreads) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += partial[w][slot];
    result[slot] = total;
  }
  __syncthreads();
}

// A as a flat array of 16-byte words: row i of A is words i * V .. i * V + V - 1 (V = R / 8). A pass is
// kWarps * W consecutive rows; thread (warp w, lane p * V + v) reads word v of row pass * rows_per_pass +
// w * W + p, so a block reads one contiguous span and every thread keeps its slice v of the ranks.
template <int R>
struct Slicing {
  static constexpr int V = R / 8;
  static constexpr int W = 32 / V;
  static constexpr int kPassRows = kWarps * W;
};

// This thread's part of x @ A for rows 0..rows-1 of x (row stride k), over the passes first, first + step,
// ...: sums[m * 8 + e] is row m, rank v * 8 + e.
template <int R, int MR>
__device__ __forceinline__ void accumulate_xa(float (&sums)[MR * 8], const half* __restrict__ x, int rows,
                                              const uint4* __restrict__ a, int k, int first, int step) {
  using S = Slicing<R>;
#pragma unroll
  for (int e = 0; e < MR * 8; ++e) sums[e] = 0.f;
  const int lane = threadIdx.x % 32;
  const int p = lane / S::V, v = lane % S::V;
  if (p >= S::W) return;  // no whole row of A left for this lane
  const int64_t stride = static_cast<int64_t>(step) * S::kPassRows;
#pragma unroll 4
  for (int64_t i = static_cast<int64_t>(first) * S::kPassRows + (threadIdx.x / 32) * S::W + p; i < k; i += stride) {
    const uint4 packed = a[i * S::V + v];
    float xi[MR];
#pragma unroll
    for (int m = 0; m < MR; ++m) xi[m] = m < rows ? __half2float(x[static_cast<int64_t>(m) * k + i]) : 0.f;
    const half2* pairs = reinterpret_cast<const half2*>(&packed);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const float2 values = __half22float2(pairs[q]);
#pragma unroll
      for (int m = 0; m < MR; ++m) {
        sums[m * 8 + 2 * q] += xi[m] * values.x;
        sums[m * 8 + 2 * q + 1] += xi[m] * values.y;
      }
    }
  }
}

// Where block_sum put row m, rank j of the block's x @ A (values laid out as accumulate_xa's sums).
template <int MR>
__device__ __forceinline__ int sum_slot(int m, int j) { return (j / 8) * (MR * 8) + m * 8 + j % 8; }

// The (y, B, out) pairs of one launch, by value: pair p's N is n[p], its column tiles (kThreads columns each,
// never spanning two pairs) are the launch's tiles tile_end[p - 1] .. tile_end[p] - 1 (from 0 for p = 0).
// Pairs past the node's last have n 0 and tile_end the total, so that a tile past the total falls in pair
// kMaxPairs - 1 with a column past its n. Members are only read with constant indices (of_pair, pair_of): a
// kernel parameter indexed at run time would be copied to local memory.
struct Pairs {
  const half* y[kMaxPairs];
  const half* b[kMaxPairs];
  half* out[kMaxPairs];
  int n[kMaxPairs];
  int tile_end[kMaxPairs];
};
static_assert(kMaxPairs == 3, "of_pair and pair_of select among three pairs");

template <typename T>
__device__ __forceinline__ T of_pair(const T (&values)[kMaxPairs], int pair) {
  return pair == 0 ? values[0] : pair == 1 ? values[1] : values[2];
}

__device__ __forceinline__ int pair_of(const Pairs& pairs, int tile) {
  return tile < pairs.tile_end[0] ? 0 : tile < pairs.tile_end[1] ? 1 : 2;
}

// This thread's column of the launch's tile `tile`: its pair, and its column there (the pair's N or more
// past the pair's last tile, in a tile's tail, or past the launch's tiles).
struct Place {
  int pair;
  int column;
};

__device__ __forceinline__ Place place_of(const Pairs& pairs, int tile) {
  const int pair = pair_of(pairs, tile);
  const int start = pair == 0 ? 0 : pair == 1 ? pairs.tile_end[0] : pairs.tile_end[1];
  return Place{pair, (tile - start) * kThreads + static_cast<int>(threadIdx.x)};
}

// One output column of a tile (tile: the launch's, over all pairs): B's column (as half2 pairs: half the
// registers), loaded ahead of x @ A for the block's first tile when there is one row (y's value with it);
// with several rows, y is read as each row is written, and the rows are a loop, not unrolled, so that the
// compiler keeps one row of xa in registers, not all of them (MR * R floats: spills at r = 64). The tile's
// place is recomputed in store (a few comparisons) rather than kept in registers across x @ A. B and y are
// read through the read-only cache: the kernel writes neither (ONNX Runtime gives outputs their own buffers).
// row0: the block's first row of x (and of every y and out).
template <int R, int MR>
struct Column {
  half2 b[R / 2];
  float y0;  // row 0's y, when loaded ahead

  __device__ __forceinline__ void load(const Pairs& pairs, int tile, int64_t row0) {
    const Place place = place_of(pairs, tile);
    const int n = of_pair(pairs.n, place.pair);
    const int column = place.column;
    const bool inside = column < n;  // false past the last tile and in a tile's tail
    const half* b_in = of_pair(pairs.b, place.pair);
    const half zero = __float2half(0.f);
#pragma unroll
    for (int j = 0; j < R / 2; ++j) {
      const half low = inside ? __ldg(&b_in[static_cast<int64_t>(2 * j) * n + column]) : zero;
      const half high = inside ? __ldg(&b_in[static_cast<int64_t>(2 * j + 1) * n + column]) : zero;
      b[j] = __halves2half2(low, high);
    }
    y0 = MR == 1 && inside ? __half2float(__ldg(&of_pair(pairs.y, place.pair)[row0 * n + column])) : 0.f;
  }

  __device__ __forceinline__ void store(const Pairs& pairs, int tile, const float (&xa)[MR][R], int rows,
                                        int64_t row0) const {
    const Place place = place_of(pairs, tile);
    const int n = of_pair(pairs.n, place.pair);
    const int column = place.column;
    if (column >= n) return;
    const half* y_in = of_pair(pairs.y, place.pair);
    half* out = of_pair(pairs.out, place.pair);
#pragma unroll 1
    for (int m = 0; m < (MR == 1 ? 1 : rows); ++m) {
      const int64_t at = (row0 + m) * n + column;
      const float y_value = MR == 1 ? y0 : __half2float(__ldg(&y_in[at]));
      float delta = 0.f;
#pragma unroll
      for (int j = 0; j < R / 2; ++j) {
        const float2 pair_values = __half22float2(b[j]);
        delta += xa[m][2 * j] * pair_values.x + xa[m][2 * j + 1] * pair_values.y;
      }
      out[at] = __float2half(y_value + delta);
    }
  }
};

// Phase 2 of a block: the launch's tiles first, first + step, ... below tile_end[kMaxPairs - 1]; `ahead` is
// tile `first`, already loaded when Prefetched.
template <int R, int MR, bool Prefetched>
__device__ __forceinline__ void add_tiles(const Column<R, MR>& ahead, const Pairs& pairs, const float (&xa)[MR][R],
                                          int rows, int64_t row0, int first, int step) {
  const int tiles = pairs.tile_end[kMaxPairs - 1];
  int tile = first;
  if (Prefetched) {
    ahead.store(pairs, tile, xa, rows, row0);
    tile += step;
  }
  for (; tile < tiles; tile += step) {
    Column<R, MR> column;
    column.load(pairs, tile, row0);
    column.store(pairs, tile, xa, rows, row0);
  }
}

// The barrier of a SplitState (see the header), in two halves so that a kernel can work between them. Every
// thread of the block calls both, after it has added its part to state->xa[generation & 1]. arrive returns
// whether this block arrived last (the same for the block's threads); that block prepares the next launch
// and releases the others, which wait in wait_for_others.
__device__ __forceinline__ bool arrive(SplitState* state, unsigned int generation) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    last = atomicAdd(&state->arrived, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (last) {  // every other block has added its part: prepare the next launch, then release them
    __threadfence();
    state->xa[(generation & 1u) ^ 1u][threadIdx.x] = 0.f;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
      atomicExch(&state->arrived, 0u);
      __threadfence();
      atomicAdd(&state->generation, 1u);
    }
  }
  return last;
}

// Returns with the block synchronized once every block has arrived.
__device__ __forceinline__ void wait_for_others(SplitState* state, unsigned int generation, bool last) {
  if (!last && threadIdx.x == 0) {
    while (*reinterpret_cast<volatile unsigned int*>(&state->generation) == generation) {
    }
    __threadfence();
  }
  __syncthreads();
}

// grid: (G), every block resident at once (see the header); rows <= MR <= kMaxSplitRows.
template <int R, int MR>
__global__ void __launch_bounds__(kThreads) lora_add_split(const Pairs pairs, const half* __restrict__ x,
                                                           const uint4* __restrict__ a, int k, int rows,
                                                           SplitState* state) {
  using S = Slicing<R>;
  __shared__ float partial[kWarps][R * MR];
  __shared__ float block_xa[R * MR];
  __shared__ float xa[MR][R];
  __shared__ unsigned int generation;
  constexpr bool kPrefetch = MR == 1;
  const int tid = threadIdx.x;
  if (tid == 0) generation = *reinterpret_cast<volatile unsigned int*>(&state->generation);

  Column<R, MR> first;
  if (kPrefetch) first.load(pairs, blockIdx.x, 0);
  float sums[MR * 8];
  accumulate_xa<R, MR>(sums, x, rows, a, k, blockIdx.x, gridDim.x);
  block_sum<S::V, MR * 8>(sums, partial, block_xa);  // also publishes `generation` to the block

  float* const scratch = state->xa[generation & 1u];
  if (static_cast<int64_t>(blockIdx.x) * S::kPassRows < k && tid < rows * R)
    atomicAdd(&scratch[tid], block_xa[sum_slot<MR>(tid / R, tid % R)]);
  wait_for_others(state, generation, arrive(state, generation));
  if (tid < rows * R) xa[tid / R][tid % R] = __ldcg(&scratch[tid]);  // L2: another block's atomics
  __syncthreads();

  add_tiles<R, MR, kPrefetch>(first, pairs, xa, rows, 0, blockIdx.x, gridDim.x);
}

// grid: (column splits, ceil(rows / MR)); block (c, g) handles rows g * MR .. and the launch's tiles c,
// c + splits, ...
template <int R, int MR>
__global__ void __launch_bounds__(kThreads) lora_add_rows(const Pairs pairs, const half* __restrict__ x,
                                                          const uint4* __restrict__ a, int k, int rows) {
  using S = Slicing<R>;
  __shared__ float partial[kWarps][R * MR];
  __shared__ float block_xa[R * MR];
  __shared__ float xa[MR][R];
  constexpr bool kPrefetch = MR == 1;
  const int tid = threadIdx.x;
  const int row0 = blockIdx.y * MR;
  const int here = rows - row0 < MR ? rows - row0 : MR;
  x += static_cast<int64_t>(row0) * k;

  Column<R, MR> first;
  if (kPrefetch) first.load(pairs, blockIdx.x, row0);
  float sums[MR * 8];
  accumulate_xa<R, MR>(sums, x, here, a, k, 0, 1);
  block_sum<S::V, MR * 8>(sums, partial, block_xa);
  if (tid < MR * R) xa[tid / R][tid % R] = block_xa[sum_slot<MR>(tid / R, tid % R)];
  __syncthreads();

  add_tiles<R, MR, kPrefetch>(first, pairs, xa, here, row0, blockIdx.x, gridDim.x);
}

// Any r (0 included: out = y), A at any address. grid: (the launch's tiles, rows); r floats of dynamic
// shared memory.
__global__ void __launch_bounds__(kThreads) lora_add_any_rank(const Pairs pairs, const half* __restrict__ x,
                                                              const half* __restrict__ a, int k, int r) {
  extern __shared__ float xa[];
  __shared__ float partial[kWarps][kAnyRankChunk];
  __shared__ float chunk[kAnyRankChunk];
  const int tid = threadIdx.x;
  const int64_t row = blockIdx.y;
  const half* x_row = x + row * k;
  for (int first = 0; first < r; first += kAnyRankChunk) {
    float sums[kAnyRankChunk];
#pragma unroll
    for (int e = 0; e < kAnyRankChunk; ++e) sums[e] = 0.f;
    for (int i = tid; i < k; i += kThreads) {
      const float xi = __half2float(x_row[i]);
      const half* a_row = a + static_cast<int64_t>(i) * r + first;
#pragma unroll
      for (int e = 0; e < kAnyRankChunk; ++e) {
        if (first + e < r) sums[e] += xi * __half2float(a_row[e]);
      }
    }
    block_sum<1, kAnyRankChunk>(sums, partial, chunk);
    if (tid < kAnyRankChunk && first + tid < r) xa[first + tid] = chunk[tid];
  }
  __syncthreads();

  const Place place = place_of(pairs, blockIdx.x);
  const int pair = place.pair, column = place.column;
  const int n = of_pair(pairs.n, pair);
  if (column >= n) return;
  const half* b = of_pair(pairs.b, pair);
  float delta = 0.f;
  for (int j = 0; j < r; ++j) delta += xa[j] * __half2float(b[static_cast<int64_t>(j) * n + column]);
  const int64_t at = row * n + column;
  of_pair(pairs.out, pair)[at] = __float2half(__half2float(of_pair(pairs.y, pair)[at]) + delta);
}

// ---- MatMulNBitsLora: the int4 product and the branch in one kernel ---------------------------------------
//
// y = x @ dequant(W) + (x @ A) @ B, where W, scales and zero_points are a MatMulNBits node's (4 bits, uint8
// zero points: two a byte, low nibble first; w = (q - zero_point) * scale per block of block_size inputs).
// Why: LoraAdd after MatMulNBits is still one more kernel a branch, ~3 us of launch and barrier at batch 1
// (0.81x decode with the adapter at 3.8 B); inside the int4 product the branch's own work (x @ A, r x N of
// B) hides behind reading the int4 weights.
//
// * int4_lora_decode<R> (one row; R = 0: the int4 product alone): each block owns a contiguous range of
//   columns, each warp a pair of them or more; the grid is as many 256-thread blocks as are resident at
//   once (four an SM), which the branch's barrier needs and the weights' latency wants (versions with two
//   blocks an SM, loading the weights directly or staging them in shared memory with cp.async, ran at a
//   quarter of the SM's warps and slower than ONNX Runtime's kernel). As lora_add_split, the blocks first
//   share x @ A over the grid (accumulate_xa), add their parts to the node's SplitState and arrive at its
//   barrier without waiting. Then every block copies x into shared memory (each 8-input group as half2
//   pairs (0,4) (1,5) (2,6) (3,7), the order in which a 32-bit word of nibbles unpacks into half2 with the
//   0x6400 exponent trick, stored plane by plane so that a warp's lanes read consecutive 16-byte words,
//   and scaled by a power of two that puts max |x| in [32, 64): products of up to 15 levels summed 16 at a
//   time in fp16 cannot overflow), and every warp computes its columns two at a time, each lane reading
//   16-byte words (32 inputs) of both rows from global memory. Only then does the block wait for x @ A (by
//   then every block has long arrived) and add xa @ B to its columns.
// * int4_gemm_rows (several rows: prompts): 64 x 64 output tiles with tensor cores (WMMA, fp32
//   accumulation), each 32-input step dequantizing the tile's weights into shared memory; the branch then
//   runs in place as LoraAdd's kernels (y = out).

struct Int4Linear {
  const uint4* w;      // [N, words]: each 16-byte word is 32 inputs
  const half* scales;  // [N, k_blocks]
  const uint8_t* zp;   // [N, zp_stride]
  const half* b;       // [r, N]
  half* out;           // [rows, N]
  int n, k, k_blocks, words, zp_stride, block_shift;  // block_size = 1 << block_shift
};

__device__ __forceinline__ half2 bits_as_half2(uint32_t bits) {
  half2 value;
  memcpy(&value, &bits, sizeof(value));
  return value;
}

__device__ __forceinline__ uint32_t half2_bits(half2 value) {
  uint32_t bits;
  memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// acc += (q - zero_point) * x over one 32-bit word of eight nibbles; bias is 1024 + zero_point in both
// halves, xg the word's eight inputs as stored (pairs (0,4) (1,5) (2,6) (3,7)).
__device__ __forceinline__ void dot_word(uint32_t w, const uint4& xg, half2 bias, half2& acc) {
  constexpr uint32_t kMask = 0x000F000Fu, kMagic = 0x64006400u;  // fp16 1024 + nibble
  acc = __hfma2(__hsub2(bits_as_half2((w & kMask) | kMagic), bias), bits_as_half2(xg.x), acc);
  acc = __hfma2(__hsub2(bits_as_half2(((w >> 4) & kMask) | kMagic), bias), bits_as_half2(xg.y), acc);
  acc = __hfma2(__hsub2(bits_as_half2(((w >> 8) & kMask) | kMagic), bias), bits_as_half2(xg.z), acc);
  acc = __hfma2(__hsub2(bits_as_half2(((w >> 12) & kMask) | kMagic), bias), bits_as_half2(xg.w), acc);
}

// A quantization block's scale and 1024 + zero point (as half2 bits), from one column's row of scales and of
// zero points (in global or shared memory).
struct Quant {
  float scale;
  half2 bias;
};

__device__ __forceinline__ Quant quant_of(const half* scale_row, const uint8_t* zero_row, int block) {
  const uint8_t byte = zero_row[block >> 1];
  const uint32_t zero = (block & 1) ? byte >> 4 : byte & 0xF;
  const uint32_t bias = 0x6400u | zero;
  return Quant{__half2float(scale_row[block]), bits_as_half2(bias | (bias << 16))};
}

// One 16-byte word (inputs 32 i .. 32 i + 31) of a column against x (shared, plane by plane: group 4 i + p
// at xs[p * words + i]): two halves of 16 inputs, each in one quantization block (block sizes 16 and up).
__device__ __forceinline__ float dot_chunk(const half* scale_row, const uint8_t* zero_row, int block_shift, int i,
                                           const uint4& q, const uint4* __restrict__ xs, int words) {
  const int low = (32 * i) >> block_shift, high = (32 * i + 16) >> block_shift;
  const Quant first = quant_of(scale_row, zero_row, low);
  const Quant second = high == low ? first : quant_of(scale_row, zero_row, high);
  const half2 zero = __float2half2_rn(0.f);
  half2 acc = zero;
  dot_word(q.x, xs[i], first.bias, acc);
  dot_word(q.y, xs[words + i], first.bias, acc);
  float2 sum = __half22float2(acc);
  const float total = (sum.x + sum.y) * first.scale;
  acc = zero;
  dot_word(q.z, xs[2 * words + i], second.bias, acc);
  dot_word(q.w, xs[3 * words + i], second.bias, acc);
  sum = __half22float2(acc);
  return total + (sum.x + sum.y) * second.scale;
}

__device__ __forceinline__ float warp_sum(float value) {
#pragma unroll
  for (int step = 16; step > 0; step /= 2) value += __shfl_xor_sync(0xffffffffu, value, step);
  return value;
}

// x (one row of k inputs, zero past k up to the padded row of `words` 16-byte words) into shared memory as
// described in the header; returns 2^-s, the factor that undoes the scaling.
__device__ __forceinline__ float load_x(const half* __restrict__ x, int k, int words, uint4* xs) {
  __shared__ float warp_max[kWarps];
  __shared__ float exponent;
  float largest = 0.f;
  const int groups = 4 * words;
  for (int g = threadIdx.x; g < groups; g += kThreads) {
    uint4 raw = make_uint4(0, 0, 0, 0);
    if (8 * g < k) raw = *reinterpret_cast<const uint4*>(x + 8 * g);  // k % 8 == 0: whole groups
    const uint32_t packed[4] = {raw.x, raw.y, raw.z, raw.w};
    half h[8];
    memcpy(h, packed, sizeof(h));
#pragma unroll
    for (int e = 0; e < 8; ++e) largest = fmaxf(largest, fabsf(__half2float(h[e])));
    xs[(g % 4) * words + g / 4] =
        make_uint4(half2_bits(__halves2half2(h[0], h[4])), half2_bits(__halves2half2(h[1], h[5])),
                   half2_bits(__halves2half2(h[2], h[6])), half2_bits(__halves2half2(h[3], h[7])));
  }
#pragma unroll
  for (int step = 16; step > 0; step /= 2) largest = fmaxf(largest, __shfl_xor_sync(0xffffffffu, largest, step));
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = largest;
  __syncthreads();
  if (threadIdx.x == 0) {
    float top = 0.f;
    for (int w = 0; w < kWarps; ++w) top = fmaxf(top, warp_max[w]);
    int e = 0;
    if (top > 0.f && isfinite(top)) {
      int power = 0;
      frexpf(top, &power);  // top = m 2^power, m in [0.5, 1)
      e = min(max(6 - power, -14), 15);
    }
    exponent = static_cast<float>(e);
  }
  __syncthreads();
  const int e = static_cast<int>(exponent);
  const half2 factor = __float2half2_rn(ldexpf(1.f, e));  // a power of two: exact in fp16
  for (int g = threadIdx.x; g < groups; g += kThreads) {
    uint4 v = xs[g];
    v.x = half2_bits(__hmul2(bits_as_half2(v.x), factor));
    v.y = half2_bits(__hmul2(bits_as_half2(v.y), factor));
    v.z = half2_bits(__hmul2(bits_as_half2(v.z), factor));
    v.w = half2_bits(__hmul2(bits_as_half2(v.w), factor));
    xs[g] = v;
  }
  __syncthreads();
  return ldexpf(1.f, -e);
}

// grid: ceil(N / (kWarps x per_warp)) blocks, all resident at once when R > 0; block b owns the columns from
// b x kWarps x per_warp on, warp w of it per_warp of them. Dynamic shared memory: x (4 x words 16-byte words),
// then kWarps x per_warp floats.
template <int R>
__global__ void __launch_bounds__(kThreads, 4) int4_lora_decode(const Int4Linear L, const half* __restrict__ x,
                                                             const uint4* __restrict__ a, int per_warp,
                                                             SplitState* state) {
  extern __shared__ uint4 xs[];
  constexpr int kR = R > 0 ? R : 8;  // array sizes (R = 0 uses none of them)
  __shared__ float partial[kWarps][kR];
  __shared__ float block_xa[kR];
  __shared__ float xa[kR];
  __shared__ unsigned int generation;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  float* results = reinterpret_cast<float*>(xs + 4 * L.words);
  const int block_first = blockIdx.x * kWarps * per_warp;
  const int block_end = min(block_first + kWarps * per_warp, L.n);

  float* scratch = nullptr;
  bool last = false;  // whether this block arrived last at the barrier
  if (R > 0) {  // this block's part of x @ A, added to the state; arrive at the barrier, wait later
    using S = Slicing<kR>;
    if (tid == 0) generation = *reinterpret_cast<volatile unsigned int*>(&state->generation);
    float sums[8];
    accumulate_xa<kR, 1>(sums, x, 1, a, L.k, blockIdx.x, gridDim.x);
    block_sum<S::V, 8>(sums, partial, block_xa);  // also publishes `generation` to the block
    scratch = state->xa[generation & 1u];
    if (static_cast<int64_t>(blockIdx.x) * S::kPassRows < L.k && tid < R)
      atomicAdd(&scratch[tid], block_xa[sum_slot<1>(0, tid)]);
    last = arrive(state, generation);
  }

  const float unscale = load_x(x, L.k, L.words, xs);  // ends with the block synchronized
  const int first = block_first + warp * per_warp;
  const int end = min(first + per_warp, L.n);
  for (int c = first; c < end; c += 2) {
    const bool two = c + 1 < end;
    const int64_t c0 = c, c1 = two ? c + 1 : c;
    const uint4* row0 = L.w + c0 * L.words;
    const uint4* row1 = L.w + c1 * L.words;
    const half* s0 = L.scales + c0 * L.k_blocks;
    const half* s1 = L.scales + c1 * L.k_blocks;
    const uint8_t* z0 = L.zp + c0 * L.zp_stride;
    const uint8_t* z1 = L.zp + c1 * L.zp_stride;
    float t0 = 0.f, t1 = 0.f;
#pragma unroll 2
    for (int i = lane; i < L.words; i += 32) {
      const uint4 q0 = __ldcs(row0 + i);
      const uint4 q1 = __ldcs(row1 + i);
      t0 += dot_chunk(s0, z0, L.block_shift, i, q0, xs, L.words);
      t1 += dot_chunk(s1, z1, L.block_shift, i, q1, xs, L.words);
    }
    t0 = warp_sum(t0);
    t1 = warp_sum(t1);
    if (lane == 0) {
      results[c - block_first] = t0 * unscale;
      if (two) results[c + 1 - block_first] = t1 * unscale;
    }
  }
  __syncthreads();

  if (R > 0) {  // wait for x @ A
    wait_for_others(state, generation, last);
    if (tid < R) xa[tid] = __ldcg(&scratch[tid]);  // L2: other blocks' atomics
    __syncthreads();
  }
  for (int c = block_first + tid; c < block_end; c += kThreads) {
    float value = results[c - block_first];
#pragma unroll
    for (int j = 0; j < R; ++j) value += xa[j] * __half2float(__ldg(&L.b[static_cast<int64_t>(j) * L.n + c]));
    L.out[c] = __float2half(value);
  }
}

constexpr int kTile = 64;       // int4_gemm_rows: output rows and columns of a block
constexpr int kTileK = 32;      // inputs a step (one 16-byte word of each column)
constexpr int kGemmThreads = 128;  // four warps, each a 32 x 32 quarter of the tile

// grid: (ceil(N / 64), ceil(rows / 64)).
__global__ void __launch_bounds__(kGemmThreads) int4_gemm_rows(const Int4Linear L, const half* __restrict__ x,
                                                               int rows) {
  using namespace nvcuda;
  __shared__ __align__(32) half x_tile[kTile][kTileK + 8];
  __shared__ __align__(32) half w_tile[kTileK][kTile + 8];
  __shared__ __align__(32) float c_tile[kTile][kTile + 4];
  const int tid = threadIdx.x, warp = tid / 32;
  const int wm = warp / 2, wn = warp % 2;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int n0 = blockIdx.x * kTile;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  for (int word = 0; word < L.words; ++word) {
    const int k0 = word * kTileK;
    for (int t = tid; t < kTile * kTileK / 8; t += kGemmThreads) {  // x: 64 rows x 4 groups of 8
      const int r = t / 4, c8 = (t % 4) * 8;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (m0 + r < rows && k0 + c8 < L.k) v = *reinterpret_cast<const uint4*>(x + (m0 + r) * L.k + k0 + c8);
      *reinterpret_cast<uint4*>(&x_tile[r][c8]) = v;
    }
    if (tid < kTile) {  // w: one column's 32 inputs a thread, dequantized
      const int64_t column = n0 + tid;
      half values[kTileK];
      if (column < L.n) {
        const uint4 q = __ldcs(L.w + column * L.words + word);
        const uint32_t words[4] = {q.x, q.y, q.z, q.w};
        const int low = k0 >> L.block_shift, high = (k0 + 16) >> L.block_shift;
        const half* scale_row = L.scales + column * L.k_blocks;
        const uint8_t* zero_row = L.zp + column * L.zp_stride;
        const Quant quants[2] = {quant_of(scale_row, zero_row, low), quant_of(scale_row, zero_row, high)};
#pragma unroll
        for (int e = 0; e < kTileK; ++e) {
          const Quant& quant = quants[e / 16];
          const float level = static_cast<float>((words[e / 8] >> (4 * (e % 8))) & 0xF);
          const float zero = static_cast<float>(half2_bits(quant.bias) & 0xF);
          values[e] = __float2half((level - zero) * quant.scale);
        }
      } else {
#pragma unroll
        for (int e = 0; e < kTileK; ++e) values[e] = __float2half(0.f);
      }
#pragma unroll
      for (int e = 0; e < kTileK; ++e) w_tile[e][tid] = values[e];
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, half, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, half, wmma::row_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &x_tile[wm * 32 + i * 16][kk], kTileK + 8);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &w_tile[kk][wn * 32 + j * 16], kTile + 8);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&c_tile[wm * 32 + i * 16][wn * 32 + j * 16], acc[i][j], kTile + 4, wmma::mem_row_major);
  __syncthreads();
  for (int t = tid; t < kTile * kTile; t += kGemmThreads) {
    const int r = t / kTile, c = t % kTile;
    if (m0 + r < rows && n0 + c < L.n) L.out[(m0 + r) * L.n + n0 + c] = __float2half(c_tile[r][c]);
  }
}

// ---- the ONNX Runtime side -------------------------------------------------------------------------------

#define RETURN_IF_ERROR(expr)               \
  do {                                      \
    OrtStatus* _status = (expr);            \
    if (_status != nullptr) return _status; \
  } while (0)

#define RETURN_IF_CUDA_ERROR(expr)                                                                        \
  do {                                                                                                    \
    const cudaError_t _error = (expr);                                                                    \
    if (_error != cudaSuccess)                                                                            \
      return g_api->CreateStatus(ORT_FAIL, (std::string("LoraAdd: ") + #expr + ": " +                     \
                                            cudaGetErrorString(_error)).c_str());                        \
  } while (0)

OrtStatus* Fail(const std::string& message) { return g_api->CreateStatus(ORT_INVALID_ARGUMENT, message.c_str()); }

constexpr int kFixedRanks[] = {8, 16, 24, 32, 48, 64};
constexpr int kFixedRankCount = sizeof(kFixedRanks) / sizeof(kFixedRanks[0]);

int FixedRankIndex(int64_t r) {
  for (int i = 0; i < kFixedRankCount; ++i)
    if (kFixedRanks[i] == r) return i;
  return -1;
}

// One stream's split state, with what the launch needs to know of that stream's device.
struct StreamState {
  cudaStream_t stream;
  int device;
  SplitState* state;
  int sms;
  int resident[kFixedRankCount][2];  // blocks of lora_add_split<R, 1> / <R, 4> that fit at once on the device
};

// Blocks of int4_lora_decode<rank> resident per SM with `shared` bytes of dynamic shared memory.
struct Occupancy {
  int rank;
  size_t shared;
  int per_sm;
};

// The kernel object ONNX Runtime keeps per node: CreateKernel makes it, KernelDestroy frees it.
struct LoraAddKernel {
  bool split = true;   // OLIVEPRESS_LORA_ADD_SPLIT != "0"
  bool trace = false;  // OLIVEPRESS_LORA_ADD_TRACE == "1"
  std::mutex mutex;
  std::vector<StreamState> streams;
  std::vector<Occupancy> occupancy;  // MatMulNBitsLora's decode kernel
};

template <int R, int MR>
OrtStatus* Resident(int sms, int& blocks) {
  int per_sm = 0;
  RETURN_IF_CUDA_ERROR(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, lora_add_split<R, MR>, kThreads, 0));
  blocks = per_sm * sms;
  return nullptr;
}

template <int R>
OrtStatus* ResidentFor(StreamState& made, int index) {
  RETURN_IF_ERROR((Resident<R, 1>(made.sms, made.resident[index][0])));
  return Resident<R, kMaxSplitRows>(made.sms, made.resident[index][1]);
}

// The stream's state (a copy: the vector may grow under another thread), made on its first run there;
// found->state stays null while the stream is being captured and has none yet (no allocation is allowed
// then): that run takes lora_add_rows.
OrtStatus* StateFor(LoraAddKernel& kernel, cudaStream_t stream, StreamState* found) {
  *found = StreamState{};
  std::lock_guard<std::mutex> lock(kernel.mutex);
  for (const StreamState& known : kernel.streams) {
    if (known.stream == stream) {
      *found = known;
      return nullptr;
    }
  }
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  RETURN_IF_CUDA_ERROR(cudaStreamIsCapturing(stream, &capturing));
  if (capturing != cudaStreamCaptureStatusNone) return nullptr;
  StreamState made{};
  made.stream = stream;
  RETURN_IF_CUDA_ERROR(cudaGetDevice(&made.device));
  RETURN_IF_CUDA_ERROR(cudaDeviceGetAttribute(&made.sms, cudaDevAttrMultiProcessorCount, made.device));
  RETURN_IF_ERROR(ResidentFor<8>(made, 0));
  RETURN_IF_ERROR(ResidentFor<16>(made, 1));
  RETURN_IF_ERROR(ResidentFor<24>(made, 2));
  RETURN_IF_ERROR(ResidentFor<32>(made, 3));
  RETURN_IF_ERROR(ResidentFor<48>(made, 4));
  RETURN_IF_ERROR(ResidentFor<64>(made, 5));
  RETURN_IF_CUDA_ERROR(cudaMalloc(&made.state, sizeof(SplitState)));
  // on the stream itself: a plain cudaMemset runs on the legacy stream, which ONNX Runtime's non-blocking
  // stream does not wait for
  const cudaError_t zeroed = cudaMemsetAsync(made.state, 0, sizeof(SplitState), stream);
  if (zeroed != cudaSuccess) {
    cudaFree(made.state);
    const std::string message = std::string("LoraAdd: cudaMemsetAsync: ") + cudaGetErrorString(zeroed);
    return g_api->CreateStatus(ORT_FAIL, message.c_str());
  }
  kernel.streams.push_back(made);
  *found = made;
  return nullptr;
}

// What one launch reads: the node's pairs and their shared x and A.
struct Operands {
  Pairs pairs;
  const half* x;
  const half* a;
  int k, rows;
};

template <int R>
void LaunchSplit(const Operands& o, int blocks, SplitState* state, cudaStream_t stream) {
  const auto* a = reinterpret_cast<const uint4*>(o.a);
  if (o.rows == 1)
    lora_add_split<R, 1><<<blocks, kThreads, 0, stream>>>(o.pairs, o.x, a, o.k, o.rows, state);
  else
    lora_add_split<R, kMaxSplitRows><<<blocks, kThreads, 0, stream>>>(o.pairs, o.x, a, o.k, o.rows, state);
}

template <int R>
void LaunchRows(const Operands& o, dim3 grid, cudaStream_t stream) {
  const auto* a = reinterpret_cast<const uint4*>(o.a);
  if (o.rows == 1)
    lora_add_rows<R, 1><<<grid, kThreads, 0, stream>>>(o.pairs, o.x, a, o.k, o.rows);
  else
    lora_add_rows<R, kRowBlock><<<grid, kThreads, 0, stream>>>(o.pairs, o.x, a, o.k, o.rows);
}

// lora_add_rows for the compiled rank kFixedRanks[rank] over `tiles` column tiles: enough blocks for two
// waves, each reading all of A once (more column splits only when rows are few). Returns its grid.
dim3 LaunchRowsKernel(const Operands& o, int rank, int tiles, int sms, cudaStream_t stream) {
  const int mr = o.rows == 1 ? 1 : kRowBlock;
  const int64_t row_blocks = (o.rows + mr - 1) / mr;
  int64_t splits = (2 * static_cast<int64_t>(sms) + row_blocks - 1) / row_blocks;
  if (splits > tiles) splits = tiles;
  if (splits < 1) splits = 1;
  const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(row_blocks));
  switch (kFixedRanks[rank]) {
    case 8: LaunchRows<8>(o, grid, stream); break;
    case 16: LaunchRows<16>(o, grid, stream); break;
    case 24: LaunchRows<24>(o, grid, stream); break;
    case 32: LaunchRows<32>(o, grid, stream); break;
    case 48: LaunchRows<48>(o, grid, stream); break;
    default: LaunchRows<64>(o, grid, stream); break;
  }
  return grid;
}

// The node's inputs: y1, x, A, B1, then the optional y2, B2, y3, B3; output p is pair p's (out1, out2, out3).
constexpr int kInputCount = 2 + 2 * kMaxPairs;
constexpr int YInput(int pair) { return pair == 0 ? 0 : 2 + 2 * pair; }
constexpr int BInput(int pair) { return pair == 0 ? 3 : 3 + 2 * pair; }

// A tensor's shape, checked to be of `expected` type.
OrtStatus* TensorShape(const OrtValue* value, ONNXTensorElementDataType expected, std::vector<int64_t>& shape) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  RETURN_IF_ERROR(g_api->GetTensorTypeAndShape(value, &info));
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  size_t count = 0;
  OrtStatus* status = g_api->GetTensorElementType(info, &type);
  if (status == nullptr) status = g_api->GetDimensionsCount(info, &count);
  if (status == nullptr) {
    shape.resize(count);
    status = g_api->GetDimensions(info, shape.data(), count);
  }
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  if (status == nullptr && type != expected)
    return Fail(expected == ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 ? "LoraAdd and MatMulNBitsLora take W and zero_points as uint8"
                                                              : "LoraAdd and MatMulNBitsLora take float16 tensors");
  return status;
}

OrtStatus* Float16Shape(const OrtValue* value, std::vector<int64_t>& shape) {
  return TensorShape(value, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, shape);
}

int64_t ElementCount(const std::vector<int64_t>& shape) {
  int64_t count = 1;
  for (const int64_t d : shape) count *= d;
  return count;
}

OrtStatus* ORT_API_CALL Compute(void* kernel_object, OrtKernelContext* context) {
  auto& kernel = *static_cast<LoraAddKernel*>(kernel_object);
  // the pairs present: KernelContext_GetInput gives null for an optional input the node names "" and must not
  // be asked past the node's input count (the inputs it lists)
  size_t input_count = 0, output_count = 0;
  RETURN_IF_ERROR(g_api->KernelContext_GetInputCount(context, &input_count));
  RETURN_IF_ERROR(g_api->KernelContext_GetOutputCount(context, &output_count));
  const OrtValue* inputs[kInputCount] = {};
  for (size_t i = 0; i < static_cast<size_t>(kInputCount) && i < input_count; ++i)
    RETURN_IF_ERROR(g_api->KernelContext_GetInput(context, i, &inputs[i]));
  for (int i = 0; i < 4; ++i)
    if (inputs[i] == nullptr) return Fail("LoraAdd: y1, x, A and B1 (its first four inputs) are required");
  int count = 1;  // pairs
  for (int p = 1; p < kMaxPairs; ++p) {
    const bool has_y = inputs[YInput(p)] != nullptr, has_b = inputs[BInput(p)] != nullptr;
    const std::string y_name = "y" + std::to_string(p + 1), b_name = "B" + std::to_string(p + 1);
    if (has_y && !has_b) return Fail("LoraAdd: input " + y_name + " is given without " + b_name);
    if (has_b && !has_y) return Fail("LoraAdd: input " + b_name + " is given without " + y_name);
    if (has_y && count != p)
      return Fail("LoraAdd: inputs " + y_name + " and " + b_name + " are given without y" + std::to_string(p) +
                  " and B" + std::to_string(p));
    if (has_y) count = p + 1;
  }
  if (output_count != static_cast<size_t>(count))
    return Fail("LoraAdd: a node with " + std::to_string(count) + " (y, B) pair(s) has as many outputs, not " +
                std::to_string(output_count));

  std::vector<int64_t> x_shape, a_shape, y_shapes[kMaxPairs], b_shape;
  RETURN_IF_ERROR(Float16Shape(inputs[1], x_shape));
  RETURN_IF_ERROR(Float16Shape(inputs[2], a_shape));
  if (x_shape.empty() || a_shape.size() != 2) return Fail("LoraAdd: x must have one dimension or more, A two");
  const int64_t k = x_shape.back(), r = a_shape[1];
  if (a_shape[0] != k) return Fail("LoraAdd: A must be [K, r] for x [..., K]");
  int64_t rows = 1;
  for (size_t d = 0; d + 1 < x_shape.size(); ++d) rows *= x_shape[d];
  if (k > INT_MAX / 2 || rows > 65535 || r > kMaxAnyRank) return Fail("LoraAdd: tensor too large");
  int64_t n[kMaxPairs] = {};
  for (int p = 0; p < count; ++p) {
    const std::string y_name = "y" + std::to_string(p + 1), b_name = "B" + std::to_string(p + 1);
    std::vector<int64_t>& y_shape = y_shapes[p];
    RETURN_IF_ERROR(Float16Shape(inputs[YInput(p)], y_shape));
    RETURN_IF_ERROR(Float16Shape(inputs[BInput(p)], b_shape));
    if (y_shape.size() != x_shape.size() || b_shape.size() != 2)
      return Fail("LoraAdd: " + y_name + " must have x's rank, " + b_name + " two dimensions");
    for (size_t d = 0; d + 1 < y_shape.size(); ++d)
      if (y_shape[d] != x_shape[d]) return Fail("LoraAdd: " + y_name + " and x differ in a leading dimension");
    n[p] = y_shape.back();
    if (b_shape[0] != r || b_shape[1] != n[p])
      return Fail("LoraAdd: " + b_name + " must be [r, N] for A [K, r] and " + y_name + " [..., N]");
    if (n[p] > INT_MAX / 2) return Fail("LoraAdd: tensor too large");
  }

  OrtValue* outputs[kMaxPairs] = {};
  for (int p = 0; p < count; ++p) {
    RETURN_IF_ERROR(g_api->KernelContext_GetOutput(context, p, y_shapes[p].data(), y_shapes[p].size(), &outputs[p]));
    if (outputs[p] == nullptr) return Fail("LoraAdd: output out" + std::to_string(p + 1) + " is missing");
  }
  Operands o{};
  int tiles = 0;  // the launch's column tiles, over all pairs
  for (int p = 0; p < kMaxPairs; ++p) {
    if (p < count && n[p] > 0) {
      void* data = nullptr;
      RETURN_IF_ERROR(g_api->GetTensorMutableData(const_cast<OrtValue*>(inputs[YInput(p)]), &data));
      o.pairs.y[p] = static_cast<const half*>(data);
      RETURN_IF_ERROR(g_api->GetTensorMutableData(const_cast<OrtValue*>(inputs[BInput(p)]), &data));
      o.pairs.b[p] = static_cast<const half*>(data);
      RETURN_IF_ERROR(g_api->GetTensorMutableData(outputs[p], &data));
      o.pairs.out[p] = static_cast<half*>(data);
      o.pairs.n[p] = static_cast<int>(n[p]);
      tiles += static_cast<int>((n[p] + kThreads - 1) / kThreads);
    }
    o.pairs.tile_end[p] = tiles;  // pairs absent or empty: no tiles, n 0
  }
  if (rows == 0 || tiles == 0) return nullptr;
  void* data = nullptr;
  RETURN_IF_ERROR(g_api->GetTensorMutableData(const_cast<OrtValue*>(inputs[1]), &data));
  o.x = static_cast<const half*>(data);
  RETURN_IF_ERROR(g_api->GetTensorMutableData(const_cast<OrtValue*>(inputs[2]), &data));
  o.a = static_cast<const half*>(data);
  o.k = static_cast<int>(k);
  o.rows = static_cast<int>(rows);
  void* stream_handle = nullptr;
  RETURN_IF_ERROR(g_api->KernelContext_GetGPUComputeStream(context, &stream_handle));
  const auto stream = static_cast<cudaStream_t>(stream_handle);

  const bool aligned = reinterpret_cast<uintptr_t>(o.a) % 16 == 0;
  const int rank = aligned ? FixedRankIndex(r) : -1;
  const char* chosen = nullptr;
  dim3 grid;

  if (rank >= 0 && kernel.split && rows <= kMaxSplitRows) {
    StreamState at;
    RETURN_IF_ERROR(StateFor(kernel, stream, &at));
    const int resident = at.state == nullptr ? 0 : at.resident[rank][rows == 1 ? 0 : 1];
    if (resident > 0) {
      const int pass_rows = kWarps * (32 / (kFixedRanks[rank] / 8));  // Slicing<R>::kPassRows
      const int64_t passes = (k + pass_rows - 1) / pass_rows;
      int64_t blocks = (passes + kPassesPerBlock - 1) / kPassesPerBlock;
      if (blocks < tiles) blocks = tiles;
      if (blocks > at.sms) blocks = at.sms;
      if (blocks > resident) blocks = resident;
      if (blocks < 1) blocks = 1;
      grid = dim3(static_cast<unsigned>(blocks));
      chosen = "split";
      switch (kFixedRanks[rank]) {
        case 8: LaunchSplit<8>(o, grid.x, at.state, stream); break;
        case 16: LaunchSplit<16>(o, grid.x, at.state, stream); break;
        case 24: LaunchSplit<24>(o, grid.x, at.state, stream); break;
        case 32: LaunchSplit<32>(o, grid.x, at.state, stream); break;
        case 48: LaunchSplit<48>(o, grid.x, at.state, stream); break;
        default: LaunchSplit<64>(o, grid.x, at.state, stream); break;
      }
    }
  }
  if (chosen == nullptr && rank >= 0) {
    int sms = 0, device = 0;
    RETURN_IF_CUDA_ERROR(cudaGetDevice(&device));
    RETURN_IF_CUDA_ERROR(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    grid = LaunchRowsKernel(o, rank, tiles, sms, stream);
    chosen = "rows";
  }
  if (chosen == nullptr) {
    grid = dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(rows));
    chosen = "any_rank";
    lora_add_any_rank<<<grid, kThreads, r * sizeof(float), stream>>>(o.pairs, o.x, o.a, o.k, static_cast<int>(r));
  }
  const cudaError_t launched = cudaGetLastError();
  if (kernel.trace) {
    std::string columns = std::to_string(n[0]);  // N of each pair: "3072+1024+1024"
    for (int p = 1; p < count; ++p) columns += "+" + std::to_string(n[p]);
    std::fprintf(stderr, "olivepress LoraAdd: rows %lld k %lld n %s r %lld: %s grid %u x %u\n",
                 static_cast<long long>(rows), static_cast<long long>(k), columns.c_str(), static_cast<long long>(r),
                 chosen, grid.x, grid.y);
  }
  if (launched != cudaSuccess) return g_api->CreateStatus(ORT_FAIL, cudaGetErrorString(launched));
  return nullptr;
}

bool EnvIs(const char* name, const char* value) {
  const char* set = std::getenv(name);
  return set != nullptr && std::strcmp(set, value) == 0;
}

OrtStatus* ORT_API_CALL CreateKernel(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo*, void** kernel) {
  auto* made = new LoraAddKernel();
  made->split = !EnvIs("OLIVEPRESS_LORA_ADD_SPLIT", "0");
  made->trace = EnvIs("OLIVEPRESS_LORA_ADD_TRACE", "1");
  *kernel = made;
  return nullptr;
}

void ORT_API_CALL DestroyKernel(void* kernel_object) {
  auto* kernel = static_cast<LoraAddKernel*>(kernel_object);
  int current = 0;
  const bool restore = cudaGetDevice(&current) == cudaSuccess;
  for (const StreamState& state : kernel->streams) {
    if (cudaSetDevice(state.device) == cudaSuccess) cudaFree(state.state);  // waits for its kernels
  }
  if (restore) cudaSetDevice(current);
  cudaGetLastError();  // nothing to report from a destructor
  delete kernel;
}

// out1 is shaped as y1. out2 and out3 get their shapes (y2's, y3's) when the node runs, not here: this
// context tells how many inputs the node has but not how many outputs, and ONNX Runtime's inference context
// indexes outputs unchecked, so shaping an output that a malformed node lacks (Compute rejects such a node
// with a message) would write out of bounds. Their type, float16, ONNX Runtime takes from the op's type
// constraints (one type each).
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
  op.GetInputTypeCount = [](const OrtCustomOp*) -> size_t { return kInputCount; };
  op.GetOutputType = [](const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16; };
  op.GetOutputTypeCount = [](const OrtCustomOp*) -> size_t { return kMaxPairs; };
  op.KernelDestroy = DestroyKernel;
  // y1, x, A, B1 and out1 required; the other pairs' inputs and outputs optional (a node lists them or not)
  op.GetInputCharacteristic = [](const OrtCustomOp*, size_t index) {
    return index < 4 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  };
  op.GetOutputCharacteristic = [](const OrtCustomOp*, size_t index) {
    return index < 1 ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
  };
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

// ---- MatMulNBitsLora on the ONNX Runtime side ------------------------------------------------------------

// Inputs: x [..., K], W uint8 [N, k_blocks, block_size / 2], scales [N * k_blocks], zero_points uint8
// [N * ceil(k_blocks / 2)] (MatMulNBits' own initializers, any shapes of those sizes but W's), A [K, r],
// B [r, N]; float16 but W and the zero points. Output y [..., N]. r may be 0 (y is the int4 product).
constexpr int kFusedInputs = 6;
constexpr int kMaxFusedK = 16384;  // x in shared memory beside the weights: 32 KB at 16384 inputs

bool FusedInputIsBytes(size_t index) { return index == 1 || index == 3; }

// Blocks of int4_lora_decode<R> resident at once per SM with `shared` bytes of dynamic shared memory,
// cached on the node's kernel (one node's shapes are fixed, so one or two entries).
template <int R>
OrtStatus* DecodeResidentPerSm(LoraAddKernel& kernel, size_t shared, int* per_sm) {
  std::lock_guard<std::mutex> lock(kernel.mutex);
  for (const Occupancy& known : kernel.occupancy) {
    if (known.rank == R && known.shared == shared) {
      *per_sm = known.per_sm;
      return nullptr;
    }
  }
  RETURN_IF_CUDA_ERROR(cudaOccupancyMaxActiveBlocksPerMultiprocessor(per_sm, int4_lora_decode<R>, kThreads, shared));
  kernel.occupancy.push_back(Occupancy{R, shared, *per_sm});
  return nullptr;
}

// One row: int4_lora_decode<R> over as many blocks as are resident at once (occupancy hides the weights'
// latency: a grid of two blocks an SM ran at a quarter of the SM's warps, slower than ONNX Runtime's kernel),
// each warp a pair of columns or more. state may be null only for R = 0.
template <int R>
OrtStatus* LaunchDecode(LoraAddKernel& kernel, const Int4Linear& L, const half* x, const half* a, int sms,
                        SplitState* state, cudaStream_t stream, dim3* grid) {
  int per_warp = 2;
  for (;;) {
    const int64_t columns_per_block = static_cast<int64_t>(kWarps) * per_warp;
    const int64_t blocks = (L.n + columns_per_block - 1) / columns_per_block;
    const size_t shared = static_cast<size_t>(L.words) * 4 * sizeof(uint4) + columns_per_block * sizeof(float);
    int per_sm = 0;
    RETURN_IF_ERROR(DecodeResidentPerSm<R>(kernel, shared, &per_sm));
    if (per_sm == 0) return Fail("MatMulNBitsLora: x does not fit in a block's shared memory");
    if (blocks <= static_cast<int64_t>(per_sm) * sms) {
      *grid = dim3(static_cast<unsigned>(blocks));
      int4_lora_decode<R><<<*grid, kThreads, shared, stream>>>(L, x, reinterpret_cast<const uint4*>(a), per_warp, state);
      return nullptr;
    }
    per_warp *= 2;  // fewer, longer blocks until all are resident at once
  }
}

OrtStatus* ORT_API_CALL FusedCompute(void* kernel_object, OrtKernelContext* context) {
  auto& kernel = *static_cast<LoraAddKernel*>(kernel_object);
  const OrtValue* inputs[kFusedInputs] = {};
  for (int i = 0; i < kFusedInputs; ++i) {
    RETURN_IF_ERROR(g_api->KernelContext_GetInput(context, i, &inputs[i]));
    if (inputs[i] == nullptr) return Fail("MatMulNBitsLora: all six inputs are required");
  }
  std::vector<int64_t> x_shape, w_shape, scales_shape, zp_shape, a_shape, b_shape;
  RETURN_IF_ERROR(TensorShape(inputs[0], ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, x_shape));
  RETURN_IF_ERROR(TensorShape(inputs[1], ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, w_shape));
  RETURN_IF_ERROR(TensorShape(inputs[2], ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, scales_shape));
  RETURN_IF_ERROR(TensorShape(inputs[3], ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, zp_shape));
  RETURN_IF_ERROR(TensorShape(inputs[4], ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, a_shape));
  RETURN_IF_ERROR(TensorShape(inputs[5], ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, b_shape));
  if (x_shape.empty() || w_shape.size() != 3 || a_shape.size() != 2 || b_shape.size() != 2)
    return Fail("MatMulNBitsLora: x must have one dimension or more, W three, A and B two");
  const int64_t k = x_shape.back(), n = w_shape[0], k_blocks = w_shape[1], block_size = 2 * w_shape[2];
  const int64_t r = a_shape[1];
  int block_shift = -1;
  for (int shift = 4; shift <= 7; ++shift)
    if (block_size == (1 << shift)) block_shift = shift;
  if (block_shift < 0) return Fail("MatMulNBitsLora: W's blocks must hold 16, 32, 64 or 128 inputs (4 bits)");
  if (k_blocks != (k + block_size - 1) / block_size)
    return Fail("MatMulNBitsLora: W [N, k_blocks, block_size / 2] does not cover x's K inputs");
  if (k % 8 != 0 || (k_blocks * block_size) % 32 != 0)
    return Fail("MatMulNBitsLora: K must be a multiple of 8 and the padded row of 32");
  if (k_blocks * block_size > kMaxFusedK) return Fail("MatMulNBitsLora: K is too large for the kernel");
  const int64_t zp_stride = (k_blocks + 1) / 2;
  if (ElementCount(scales_shape) != n * k_blocks || ElementCount(zp_shape) != n * zp_stride)
    return Fail("MatMulNBitsLora: scales must hold N * k_blocks values, zero_points N * ceil(k_blocks / 2) bytes");
  if (a_shape[0] != k || b_shape[0] != r || b_shape[1] != n)
    return Fail("MatMulNBitsLora: A must be [K, r] and B [r, N]");
  if (n > INT_MAX / 2 || r > kMaxAnyRank) return Fail("MatMulNBitsLora: tensor too large");
  int64_t rows = 1;
  for (size_t d = 0; d + 1 < x_shape.size(); ++d) rows *= x_shape[d];
  if (rows > 65535LL * kTile) return Fail("MatMulNBitsLora: too many rows");

  std::vector<int64_t> y_shape = x_shape;
  y_shape.back() = n;
  OrtValue* output = nullptr;
  RETURN_IF_ERROR(g_api->KernelContext_GetOutput(context, 0, y_shape.data(), y_shape.size(), &output));
  if (rows == 0 || n == 0) return nullptr;
  void* data[kFusedInputs] = {};
  for (int i = 0; i < kFusedInputs; ++i)
    RETURN_IF_ERROR(g_api->GetTensorMutableData(const_cast<OrtValue*>(inputs[i]), &data[i]));
  void* out = nullptr;
  RETURN_IF_ERROR(g_api->GetTensorMutableData(output, &out));
  Int4Linear L{};
  L.w = static_cast<const uint4*>(data[1]);
  L.scales = static_cast<const half*>(data[2]);
  L.zp = static_cast<const uint8_t*>(data[3]);
  L.b = static_cast<const half*>(data[5]);
  L.out = static_cast<half*>(out);
  L.n = static_cast<int>(n);
  L.k = static_cast<int>(k);
  L.k_blocks = static_cast<int>(k_blocks);
  L.words = static_cast<int>(k_blocks * block_size / 32);
  L.zp_stride = static_cast<int>(zp_stride);
  L.block_shift = block_shift;
  const auto* x = static_cast<const half*>(data[0]);
  const auto* a = static_cast<const half*>(data[4]);
  void* stream_handle = nullptr;
  RETURN_IF_ERROR(g_api->KernelContext_GetGPUComputeStream(context, &stream_handle));
  const auto stream = static_cast<cudaStream_t>(stream_handle);
  if (reinterpret_cast<uintptr_t>(L.w) % 16 != 0 || reinterpret_cast<uintptr_t>(x) % 16 != 0)
    return Fail("MatMulNBitsLora: W and x must be 16-byte aligned");

  const bool aligned = reinterpret_cast<uintptr_t>(a) % 16 == 0;
  const int rank = aligned ? FixedRankIndex(r) : -1;
  const char* chosen = nullptr;
  bool branch_done = r == 0;
  dim3 grid;
  int device = 0, sms = 0;
  RETURN_IF_CUDA_ERROR(cudaGetDevice(&device));
  RETURN_IF_CUDA_ERROR(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  if (rows == 1) {
    StreamState at{};
    if (rank >= 0 && kernel.split) RETURN_IF_ERROR(StateFor(kernel, stream, &at));
    if (at.state != nullptr) {
      chosen = "decode with branch";
      branch_done = true;
      switch (kFixedRanks[rank]) {
        case 8: RETURN_IF_ERROR(LaunchDecode<8>(kernel, L, x, a, sms, at.state, stream, &grid)); break;
        case 16: RETURN_IF_ERROR(LaunchDecode<16>(kernel, L, x, a, sms, at.state, stream, &grid)); break;
        case 24: RETURN_IF_ERROR(LaunchDecode<24>(kernel, L, x, a, sms, at.state, stream, &grid)); break;
        case 32: RETURN_IF_ERROR(LaunchDecode<32>(kernel, L, x, a, sms, at.state, stream, &grid)); break;
        case 48: RETURN_IF_ERROR(LaunchDecode<48>(kernel, L, x, a, sms, at.state, stream, &grid)); break;
        default: RETURN_IF_ERROR(LaunchDecode<64>(kernel, L, x, a, sms, at.state, stream, &grid)); break;
      }
    } else {
      chosen = "decode";
      RETURN_IF_ERROR(LaunchDecode<0>(kernel, L, x, a, sms, nullptr, stream, &grid));
    }
  } else {
    chosen = "rows";
    grid = dim3(static_cast<unsigned>((n + kTile - 1) / kTile), static_cast<unsigned>((rows + kTile - 1) / kTile));
    int4_gemm_rows<<<grid, kGemmThreads, 0, stream>>>(L, x, static_cast<int>(rows));
  }
  RETURN_IF_CUDA_ERROR(cudaGetLastError());
  std::string branch = "";
  if (!branch_done) {  // the branch in place (y = out), as LoraAdd adds it
    Operands o{};
    o.pairs.y[0] = L.out;
    o.pairs.b[0] = L.b;
    o.pairs.out[0] = L.out;
    o.pairs.n[0] = L.n;
    const int tiles = static_cast<int>((n + kThreads - 1) / kThreads);
    for (int p = 0; p < kMaxPairs; ++p) o.pairs.tile_end[p] = tiles;
    o.x = x;
    o.a = a;
    o.k = L.k;
    o.rows = static_cast<int>(rows);
    if (rank >= 0) {
      LaunchRowsKernel(o, rank, tiles, sms, stream);
      branch = " + rows branch";
    } else {
      branch = " + any_rank branch";
      const dim3 any_grid(static_cast<unsigned>(tiles), static_cast<unsigned>(rows));
      lora_add_any_rank<<<any_grid, kThreads, r * sizeof(float), stream>>>(o.pairs, o.x, o.a, o.k, static_cast<int>(r));
    }
  }
  const cudaError_t launched = cudaGetLastError();
  if (kernel.trace)
    std::fprintf(stderr, "olivepress MatMulNBitsLora: rows %lld k %lld n %lld r %lld: %s%s grid %u x %u\n",
                 static_cast<long long>(rows), static_cast<long long>(k), static_cast<long long>(n),
                 static_cast<long long>(r), chosen, branch.c_str(), grid.x, grid.y);
  if (launched != cudaSuccess) return g_api->CreateStatus(ORT_FAIL, cudaGetErrorString(launched));
  return nullptr;
}

// y is x's shape with N, W's first dimension, last.
OrtStatus* ORT_API_CALL FusedInferShape(const OrtCustomOp*, OrtShapeInferContext* context) {
  OrtTensorTypeAndShapeInfo* x_info = nullptr;  // the context's own: not released here
  OrtTensorTypeAndShapeInfo* w_info = nullptr;
  RETURN_IF_ERROR(g_api->ShapeInferContext_GetInputTypeShape(context, 0, &x_info));
  RETURN_IF_ERROR(g_api->ShapeInferContext_GetInputTypeShape(context, 1, &w_info));
  size_t rank = 0, w_rank = 0;
  RETURN_IF_ERROR(g_api->GetDimensionsCount(x_info, &rank));
  RETURN_IF_ERROR(g_api->GetDimensionsCount(w_info, &w_rank));
  if (rank == 0 || w_rank != 3) return Fail("MatMulNBitsLora: x must have one dimension or more, W three");
  std::vector<int64_t> dims(rank), w_dims(w_rank);
  std::vector<const char*> names(rank);
  RETURN_IF_ERROR(g_api->GetDimensions(x_info, dims.data(), rank));
  RETURN_IF_ERROR(g_api->GetSymbolicDimensions(x_info, names.data(), rank));
  RETURN_IF_ERROR(g_api->GetDimensions(w_info, w_dims.data(), w_rank));
  dims.back() = w_dims[0];
  names.back() = "";
  OrtTensorTypeAndShapeInfo* y_info = nullptr;
  RETURN_IF_ERROR(g_api->CreateTensorTypeAndShapeInfo(&y_info));
  OrtStatus* status = g_api->SetTensorElementType(y_info, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16);
  if (status == nullptr) status = g_api->SetDimensions(y_info, dims.data(), rank);
  if (status == nullptr) status = g_api->SetSymbolicDimensions(y_info, names.data(), rank);
  if (status == nullptr) status = g_api->ShapeInferContext_SetOutputTypeShape(context, 0, y_info);
  g_api->ReleaseTensorTypeAndShapeInfo(y_info);
  return status;
}

OrtCustomOp MakeFusedOp() {
  OrtCustomOp op = MakeOp();
  op.GetName = [](const OrtCustomOp*) { return "MatMulNBitsLora"; };
  op.GetInputType = [](const OrtCustomOp*, size_t index) {
    return FusedInputIsBytes(index) ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  };
  op.GetInputTypeCount = [](const OrtCustomOp*) -> size_t { return kFusedInputs; };
  op.GetOutputTypeCount = [](const OrtCustomOp*) -> size_t { return 1; };
  op.GetInputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
  op.GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
  op.KernelComputeV2 = FusedCompute;
  op.InferOutputShapeFn = FusedInferShape;
  return op;
}

OrtCustomOp g_matmul_nbits_lora = MakeFusedOp();


}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  g_api = api_base->GetApi(ORT_API_VERSION);
  if (g_api == nullptr) return nullptr;  // an onnxruntime older than this header: nothing registered
  OrtCustomOpDomain* domain = nullptr;
  RETURN_IF_ERROR(g_api->CreateCustomOpDomain("olivepress", &domain));
  RETURN_IF_ERROR(g_api->CustomOpDomain_Add(domain, &g_lora_add));
  RETURN_IF_ERROR(g_api->CustomOpDomain_Add(domain, &g_matmul_nbits_lora));
  return g_api->AddCustomOpDomain(options, domain);
}
