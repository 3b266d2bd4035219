// vramcore device digest: the rfc6962-sha256 Merkle tree over fixed-size leaves, on the GPU.
//
// One source, three compilers:
//   * NVRTC (CuPy RawModule, PyCUDA via nvcc/NVRTC) and nvcc: real CUDA.
//   * g++ / clang++ as host C++ with `-include host_shim.h`: the shim defines the CUDA
//     keywords and runs each grid-stride kernel over a simulated grid, so the very same code
//     is checked against hashlib on machines without a GPU (tests/test_kernel_host.py).
// No #include: NVRTC has no standard headers on its default path.
//
// Digest (vramcore.digest, RFC 6962 / RFC 9162):
//   leaf hash  = SHA-256(0x00 || data[i*leaf_size : min((i+1)*leaf_size, nbytes)])
//   node hash  = SHA-256(0x01 || left || right)
//   tree       = pair neighbours level by level, an odd last node moves up unchanged
//                (the same root as RFC 6962's split at the largest power of two below n).
//
// Performance (see GPU-NOTES): SHA-256 is sequential inside a leaf, so one thread hashes one
// leaf. A full 64 KiB leaf is 1,025 compression blocks whose data sit one byte off the block
// boundary (the 0x00 prefix); the fast path loads aligned 16-byte vectors and realigns them
// with one byte permute per message word (`__byte_perm`, a PRMT instruction). The message
// schedule is a rolling 16-word window and the rounds are fully unrolled so everything stays
// in registers. A leaf whose start is not 16-byte aligned, and the last partial block of
// every leaf, go through the byte path (bounds-checked, never reads past the leaf).

#if !defined(__CUDACC__) && !defined(VRAMCORE_HOST_SHIM)
#error "compile with nvcc or NVRTC, or as host C++ with -include host_shim.h"
#endif

#if defined(__CUDACC__)
#define VC_FN __device__ __forceinline__
#define VC_UNROLL _Pragma("unroll")
#else
#define VC_FN static inline
#define VC_UNROLL
#endif

// Threads per block the leaf kernels are built for (vramcore.kernels.MAX_BLOCK).
#define VC_MAX_BLOCK 640

typedef unsigned int vc_u32;
typedef unsigned long long vc_u64;

#define VC_ROTR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

#if defined(__CUDACC__)
__constant__ vc_u32 VC_K[64] = {
#else
static const vc_u32 VC_K[64] = {
#endif
    0x428a2f98u, 0x71374491u, 0xb5c0fbcfu, 0xe9b5dba5u, 0x3956c25bu, 0x59f111f1u, 0x923f82a4u,
    0xab1c5ed5u, 0xd807aa98u, 0x12835b01u, 0x243185beu, 0x550c7dc3u, 0x72be5d74u, 0x80deb1feu,
    0x9bdc06a7u, 0xc19bf174u, 0xe49b69c1u, 0xefbe4786u, 0x0fc19dc6u, 0x240ca1ccu, 0x2de92c6fu,
    0x4a7484aau, 0x5cb0a9dcu, 0x76f988dau, 0x983e5152u, 0xa831c66du, 0xb00327c8u, 0xbf597fc7u,
    0xc6e00bf3u, 0xd5a79147u, 0x06ca6351u, 0x14292967u, 0x27b70a85u, 0x2e1b2138u, 0x4d2c6dfcu,
    0x53380d13u, 0x650a7354u, 0x766a0abbu, 0x81c2c92eu, 0x92722c85u, 0xa2bfe8a1u, 0xa81a664bu,
    0xc24b8b70u, 0xc76c51a3u, 0xd192e819u, 0xd6990624u, 0xf40e3585u, 0x106aa070u, 0x19a4c116u,
    0x1e376c08u, 0x2748774cu, 0x34b0bcb5u, 0x391c0cb3u, 0x4ed8aa4au, 0x5b9cca4fu, 0x682e6ff3u,
    0x748f82eeu, 0x78a5636fu, 0x84c87814u, 0x8cc70208u, 0x90befffau, 0xa4506cebu, 0xbef9a3f7u,
    0xc67178f2u};

VC_FN void vc_sha256_init(vc_u32 s[8]) {
    s[0] = 0x6a09e667u;
    s[1] = 0xbb67ae85u;
    s[2] = 0x3c6ef372u;
    s[3] = 0xa54ff53au;
    s[4] = 0x510e527fu;
    s[5] = 0x9b05688cu;
    s[6] = 0x1f83d9abu;
    s[7] = 0x5be0cd19u;
}

// One SHA-256 compression of the 16 big-endian message words w (clobbered) into s.
VC_FN void vc_sha256_compress(vc_u32 s[8], vc_u32 w[16]) {
    vc_u32 a = s[0], b = s[1], c = s[2], d = s[3], e = s[4], f = s[5], g = s[6], h = s[7];
    VC_UNROLL
    for (int r = 0; r < 64; ++r) {
        vc_u32 wr;
        if (r < 16) {
            wr = w[r];
        } else {
            vc_u32 w15 = w[(r - 15) & 15], w2 = w[(r - 2) & 15];
            vc_u32 s0 = VC_ROTR(w15, 7) ^ VC_ROTR(w15, 18) ^ (w15 >> 3);
            vc_u32 s1 = VC_ROTR(w2, 17) ^ VC_ROTR(w2, 19) ^ (w2 >> 10);
            wr = w[r & 15] + s0 + w[(r - 7) & 15] + s1;
            w[r & 15] = wr;
        }
        vc_u32 S1 = VC_ROTR(e, 6) ^ VC_ROTR(e, 11) ^ VC_ROTR(e, 25);
        vc_u32 ch = (e & f) ^ (~e & g);
        vc_u32 t1 = h + S1 + ch + VC_K[r] + wr;
        vc_u32 S0 = VC_ROTR(a, 2) ^ VC_ROTR(a, 13) ^ VC_ROTR(a, 22);
        vc_u32 mj = (a & b) ^ (a & c) ^ (b & c);
        vc_u32 t2 = S0 + mj;
        h = g;
        g = f;
        f = e;
        e = d + t1;
        d = c;
        c = b;
        b = a;
        a = t1 + t2;
    }
    s[0] += a;
    s[1] += b;
    s[2] += c;
    s[3] += d;
    s[4] += e;
    s[5] += f;
    s[6] += g;
    s[7] += h;
}

// Big-endian word from the last byte of `prev` and the first three bytes of `cur`, both
// little-endian loads of consecutive aligned words: the message is one byte off alignment.
VC_FN vc_u32 vc_realign(vc_u32 prev, vc_u32 cur) {
#if defined(__CUDA_ARCH__)
    return __byte_perm(prev, cur, 0x3456);
#else
    return (prev & 0xff000000u) | ((cur & 0xffu) << 16) | (cur & 0xff00u) |
           ((cur >> 16) & 0xffu);
#endif
}

// Aligned 16-byte load as four little-endian words.
VC_FN void vc_load16(const unsigned char* p, vc_u32 out[4]) {
#if defined(__CUDACC__)
    uint4 v = *reinterpret_cast<const uint4*>(p);
    out[0] = v.x;
    out[1] = v.y;
    out[2] = v.z;
    out[3] = v.w;
#else
    vc_host_load16(p, out);
#endif
}

// Byte `pos` of the padded message prefix || data[0:len] (SHA-256 padding, no length field).
VC_FN vc_u32 vc_msg_byte(unsigned char prefix, const unsigned char* data, vc_u64 len, vc_u64 pos) {
    if (pos == 0) return prefix;
    if (pos <= len) return data[pos - 1];
    return pos == len + 1 ? 0x80u : 0u;
}

// Compress blocks [k0, nblocks) of prefix || data[0:len] byte by byte, padding included.
VC_FN void vc_sha256_tail(vc_u32 s[8], unsigned char prefix, const unsigned char* data,
                          vc_u64 len, vc_u64 k0) {
    const vc_u64 msg_len = len + 1;
    const vc_u64 nblocks = (msg_len + 8) / 64 + 1;
    for (vc_u64 k = k0; k < nblocks; ++k) {
        vc_u32 w[16];
        for (int j = 0; j < 16; ++j) {
            vc_u64 pos = k * 64 + (vc_u64)j * 4;
            w[j] = (vc_msg_byte(prefix, data, len, pos) << 24) |
                   (vc_msg_byte(prefix, data, len, pos + 1) << 16) |
                   (vc_msg_byte(prefix, data, len, pos + 2) << 8) |
                   vc_msg_byte(prefix, data, len, pos + 3);
        }
        if (k == nblocks - 1) {
            const vc_u64 bits = msg_len * 8;
            w[14] = (vc_u32)(bits >> 32);
            w[15] = (vc_u32)bits;
        }
        vc_sha256_compress(s, w);
    }
}

// Store the digest big-endian.
VC_FN void vc_store_digest(const vc_u32 s[8], unsigned char* out) {
    for (int i = 0; i < 8; ++i) {
        out[4 * i] = (unsigned char)(s[i] >> 24);
        out[4 * i + 1] = (unsigned char)(s[i] >> 16);
        out[4 * i + 2] = (unsigned char)(s[i] >> 8);
        out[4 * i + 3] = (unsigned char)s[i];
    }
}

// SHA-256(0x00 || data[0:len]) into out[0:32].
VC_FN void vc_leaf_hash(const unsigned char* data, vc_u64 len, unsigned char* out) {
    vc_u32 s[8];
    vc_sha256_init(s);
    vc_u64 k = 0;
    if ((((unsigned long long)(const void*)data) & 15u) == 0) {
        // Fast path: block k needs data[64k-1 .. 64k+63); load data[64k .. 64k+64) aligned
        // while that stays inside the leaf, carrying the byte before from the last block.
        // The loads of block k+1 are issued before block k is compressed, so their latency
        // overlaps the 64 rounds (software pipelining; 16 more registers).
        const vc_u64 fast_blocks = len / 64;
        vc_u32 prev = 0;  // the 0x00 prefix: the "byte before" data[0]
        vc_u32 next[16];
        if (fast_blocks > 0) {
            VC_UNROLL
            for (int q = 0; q < 4; ++q) vc_load16(data + 16 * q, next + 4 * q);
        }
        for (; k < fast_blocks; ++k) {
            vc_u32 a[16];
            VC_UNROLL
            for (int j = 0; j < 16; ++j) a[j] = next[j];
            if (k + 1 < fast_blocks) {
                const unsigned char* p = data + (k + 1) * 64;
                VC_UNROLL
                for (int q = 0; q < 4; ++q) vc_load16(p + 16 * q, next + 4 * q);
            }
            vc_u32 w[16];
            w[0] = vc_realign(prev, a[0]);
            VC_UNROLL
            for (int j = 1; j < 16; ++j) w[j] = vc_realign(a[j - 1], a[j]);
            prev = a[15];
            vc_sha256_compress(s, w);
        }
    }
    vc_sha256_tail(s, 0x00, data, len, k);
    vc_store_digest(s, out);
}

// SHA-256(0x00 || leaf `leaf`) of the nbytes buffer `data` into out[0:32]; the last leaf may
// be shorter, a leaf past the end is empty.
VC_FN void vc_leaf_hash_at(const unsigned char* data, vc_u64 nbytes, vc_u64 leaf_size,
                           vc_u64 leaf, unsigned char* out) {
    const vc_u64 start = leaf * leaf_size;
    vc_u64 len = 0;
    if (start < nbytes) len = nbytes - start < leaf_size ? nbytes - start : leaf_size;
    vc_leaf_hash(data + start, len, out);
}

// SHA-256(0x01 || left || right) into out[0:32].
VC_FN void vc_node_hash(const unsigned char* left, const unsigned char* right, unsigned char* out) {
    unsigned char m[64];
    for (int i = 0; i < 32; ++i) m[i] = left[i];
    for (int i = 0; i < 32; ++i) m[32 + i] = right[i];
    vc_u32 s[8];
    vc_sha256_init(s);
    vc_sha256_tail(s, 0x01, m, 64, 0);
    vc_store_digest(s, out);
}

// Leaf hashes of leaves first_leaf .. first_leaf+count of the nbytes buffer `data`:
// out[32*i : 32*i+32] = SHA-256(0x00 || leaf first_leaf+i). One leaf per thread, grid-stride.
// At most VC_MAX_BLOCK threads per block: the launch bound caps the registers per thread at
// 65536 / 768 = 85 so that a 768-thread block fits an SM's register file; larger blocks gain
// no occupancy with this register use (see vramcore.kernels.MAX_BLOCK).
extern "C" __global__ void __launch_bounds__(VC_MAX_BLOCK)
    vramcore_leaf_hashes(const unsigned char* __restrict__ data, unsigned long long nbytes,
                         unsigned long long leaf_size, unsigned long long first_leaf,
                         unsigned long long count, unsigned char* __restrict__ out) {
    const vc_u64 stride = (vc_u64)blockDim.x * gridDim.x;
    for (vc_u64 i = (vc_u64)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += stride) {
        vc_leaf_hash_at(data, nbytes, leaf_size, first_leaf + i, out + 32 * i);
    }
}

// Leaf hashes of the listed leaves (a sampled check in one launch):
// out[32*i : 32*i+32] = SHA-256(0x00 || leaf indices[i]), i < count. The caller checks that
// every index is a leaf of the buffer; one leaf per thread, grid-stride.
extern "C" __global__ void __launch_bounds__(VC_MAX_BLOCK)
    vramcore_leaf_hashes_at(const unsigned char* __restrict__ data, unsigned long long nbytes,
                            unsigned long long leaf_size,
                            const unsigned long long* __restrict__ indices,
                            unsigned long long count, unsigned char* __restrict__ out) {
    const vc_u64 stride = (vc_u64)blockDim.x * gridDim.x;
    for (vc_u64 i = (vc_u64)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += stride) {
        vc_leaf_hash_at(data, nbytes, leaf_size, indices[i], out + 32 * i);
    }
}

// One tree level: out[i] = SHA-256(0x01 || in[2i] || in[2i+1]); when n is odd the last node
// in[n-1] is copied to out[(n-1)/2]. `out` holds ceil(n/2) 32-byte nodes, `in` n of them.
extern "C" __global__ void vramcore_merkle_level(const unsigned char* __restrict__ in,
                                                 unsigned long long n,
                                                 unsigned char* __restrict__ out) {
    const vc_u64 stride = (vc_u64)blockDim.x * gridDim.x;
    const vc_u64 parents = (n + 1) / 2;
    for (vc_u64 i = (vc_u64)blockIdx.x * blockDim.x + threadIdx.x; i < parents; i += stride) {
        if (2 * i + 1 < n) {
            vc_node_hash(in + 64 * i, in + 64 * i + 32, out + 32 * i);
        } else {
            for (int b = 0; b < 32; ++b) out[32 * i + b] = in[64 * i + b];
        }
    }
}
