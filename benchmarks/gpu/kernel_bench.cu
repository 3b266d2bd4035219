// Native check and timing of the device digest kernels, independent of CuPy and PyCUDA.
//
//   nvcc -O3 -arch=sm_90 -I vramcore/kernels benchmarks/gpu/kernel_bench.cu -o kernel_bench
//   ./kernel_bench 268435456 1073741824 ...      (shard sizes in bytes)
//
// For each size: fills a cudaMalloc'd buffer with word k = k * 2654435761 (little-endian
// uint32; benchmarks/gpu/kernel_check.py rebuilds it with numpy), times the leaf kernel and the
// tree levels with CUDA events (best of 5, after a warm-up), and prints one JSON line with the
// root, so a host digest of the same pattern checks the result. A first line gives the
// device and its device-to-device copy bandwidth (the memory-speed reference).
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "merkle_sha256.cu"

#define CHECK(call)                                                                   \
    do {                                                                              \
        cudaError_t err_ = (call);                                                    \
        if (err_ != cudaSuccess) {                                                    \
            std::printf("{\"error\": \"%s: %s\"}\n", #call, cudaGetErrorName(err_));  \
            std::exit(1);                                                             \
        }                                                                             \
    } while (0)

static const unsigned long long LEAF = 65536;
static const unsigned int BLOCK = 128;

__global__ void fill_pattern(unsigned int* words, unsigned long long n) {
    unsigned long long stride = (unsigned long long)blockDim.x * gridDim.x;
    for (unsigned long long k = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; k < n;
         k += stride) {
        words[k] = (unsigned int)k * 2654435761u;
    }
}

static unsigned int grid_for(unsigned long long items) {
    unsigned long long g = (items + BLOCK - 1) / BLOCK;
    if (g < 1) g = 1;
    if (g > 65535) g = 65535;
    return (unsigned int)g;
}

int main(int argc, char** argv) {
    cudaDeviceProp prop;
    CHECK(cudaGetDeviceProperties(&prop, 0));
    cudaEvent_t start, stop;
    CHECK(cudaEventCreate(&start));
    CHECK(cudaEventCreate(&stop));

    // Device copy bandwidth: 1 GiB device to device, best of 5.
    const size_t copy_bytes = 1ull << 30;
    void *a = nullptr, *b = nullptr;
    CHECK(cudaMalloc(&a, copy_bytes));
    CHECK(cudaMalloc(&b, copy_bytes));
    CHECK(cudaMemset(a, 1, copy_bytes));
    float best_copy = 1e30f;
    for (int r = 0; r < 6; ++r) {
        CHECK(cudaEventRecord(start));
        CHECK(cudaMemcpy(b, a, copy_bytes, cudaMemcpyDeviceToDevice));
        CHECK(cudaEventRecord(stop));
        CHECK(cudaEventSynchronize(stop));
        float ms = 0;
        CHECK(cudaEventElapsedTime(&ms, start, stop));
        if (r > 0 && ms < best_copy) best_copy = ms;
    }
    CHECK(cudaFree(a));
    CHECK(cudaFree(b));
    std::printf(
        "{\"device\": \"%s\", \"sm\": %d, \"cc\": \"%d.%d\", \"copy_gbps\": %.1f}\n", prop.name,
        prop.multiProcessorCount, prop.major, prop.minor, copy_bytes / (best_copy * 1e6));

    for (int i = 1; i < argc; ++i) {
        unsigned long long nbytes = std::strtoull(argv[i], nullptr, 10);
        unsigned long long n = (nbytes + LEAF - 1) / LEAF;
        unsigned long long words = (nbytes + 3) / 4;
        unsigned char *data = nullptr, *leaves = nullptr, *other = nullptr;
        CHECK(cudaMalloc(&data, words * 4));
        CHECK(cudaMalloc(&leaves, 32 * n));
        CHECK(cudaMalloc(&other, 32 * ((n + 1) / 2)));
        fill_pattern<<<grid_for(words), BLOCK>>>((unsigned int*)data, words);
        CHECK(cudaGetLastError());
        float best_leaf = 1e30f, best_tree = 1e30f;
        unsigned char* root_at = leaves;
        for (int r = 0; r < 6; ++r) {
            CHECK(cudaEventRecord(start));
            vramcore_leaf_hashes<<<grid_for(n), BLOCK>>>(data, nbytes, LEAF, 0, n, leaves);
            CHECK(cudaEventRecord(stop));
            CHECK(cudaEventSynchronize(stop));
            CHECK(cudaGetLastError());
            float ms = 0;
            CHECK(cudaEventElapsedTime(&ms, start, stop));
            if (r > 0 && ms < best_leaf) best_leaf = ms;
            CHECK(cudaEventRecord(start));
            unsigned char *src = leaves, *dst = other;
            for (unsigned long long level = n; level > 1; level = (level + 1) / 2) {
                vramcore_merkle_level<<<grid_for((level + 1) / 2), BLOCK>>>(src, level, dst);
                unsigned char* t = src;
                src = dst;
                dst = t;
            }
            CHECK(cudaEventRecord(stop));
            CHECK(cudaEventSynchronize(stop));
            CHECK(cudaGetLastError());
            CHECK(cudaEventElapsedTime(&ms, start, stop));
            if (r > 0 && ms < best_tree) best_tree = ms;
            root_at = src;
        }
        unsigned char root[32];
        CHECK(cudaMemcpy(root, root_at, 32, cudaMemcpyDeviceToHost));
        char hex[65];
        for (int k = 0; k < 32; ++k) std::snprintf(hex + 2 * k, 3, "%02x", root[k]);
        std::printf(
            "{\"bytes\": %llu, \"leaves\": %llu, \"leaf_ms\": %.3f, \"tree_ms\": %.3f, "
            "\"leaf_gbps\": %.1f, \"root\": \"%s\"}\n",
            nbytes, n, best_leaf, best_tree, nbytes / (best_leaf * 1e6), hex);
        std::fflush(stdout);
        CHECK(cudaFree(data));
        CHECK(cudaFree(leaves));
        CHECK(cudaFree(other));
    }
    return 0;
}
