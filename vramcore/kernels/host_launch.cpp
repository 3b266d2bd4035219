// Host build of the device digest kernels, for tests on machines with no GPU:
//   g++ -O2 -shared -fPIC -include host_shim.h host_launch.cpp -o libvramcore_kernels_host.so
// Each entry point runs one kernel over a simulated grid x block launch (host_shim.h), with
// the same arguments, in the same order, as the CUDA kernel it wraps.
#include "merkle_sha256.cu"

extern "C" void vc_host_leaf_hashes(unsigned int grid, unsigned int block,
                                    const unsigned char* data, unsigned long long nbytes,
                                    unsigned long long leaf_size, unsigned long long first_leaf,
                                    unsigned long long count, unsigned char* out) {
    vc_host_launch(grid, block, vramcore_leaf_hashes, data, nbytes, leaf_size, first_leaf, count,
                   out);
}

extern "C" void vc_host_leaf_hashes_at(unsigned int grid, unsigned int block,
                                       const unsigned char* data, unsigned long long nbytes,
                                       unsigned long long leaf_size,
                                       const unsigned long long* indices,
                                       unsigned long long count, unsigned char* out) {
    vc_host_launch(grid, block, vramcore_leaf_hashes_at, data, nbytes, leaf_size, indices, count,
                   out);
}

extern "C" void vc_host_merkle_level(unsigned int grid, unsigned int block,
                                     const unsigned char* in, unsigned long long n,
                                     unsigned char* out) {
    vc_host_launch(grid, block, vramcore_merkle_level, in, n, out);
}
