// Host shim: compile merkle_sha256.cu as plain C++ (g++ -include host_shim.h), so the device
// digest is tested against hashlib on machines with no GPU. It defines the CUDA keywords the
// kernel uses and a sequential "grid" that runs every (block, thread) pair of a launch; the
// kernels are grid-stride loops with no shared memory or barriers, so sequential execution
// computes exactly what a GPU launch of the same geometry computes.
#ifndef VRAMCORE_HOST_SHIM
#define VRAMCORE_HOST_SHIM 1

#include <cstring>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __constant__
#define __launch_bounds__(...)

struct vc_dim3 {
    unsigned int x, y, z;
};

static vc_dim3 threadIdx, blockIdx, blockDim, gridDim;

static inline void vc_host_load16(const unsigned char* p, unsigned int out[4]) {
    std::memcpy(out, p, 16);  // little-endian host, as on the GPU
}

// Run `kernel(args...)` over grid x block threads, one after the other.
template <typename Kernel, typename... Args>
static void vc_host_launch(unsigned int grid, unsigned int block, Kernel kernel, Args... args) {
    gridDim = {grid, 1, 1};
    blockDim = {block, 1, 1};
    for (unsigned int b = 0; b < grid; ++b) {
        for (unsigned int t = 0; t < block; ++t) {
            blockIdx = {b, 0, 0};
            threadIdx = {t, 0, 0};
            kernel(args...);
        }
    }
}

#endif
