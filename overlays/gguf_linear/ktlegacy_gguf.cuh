// ktlegacy: GGUF (ggml) weight blocks, decoded eight values at a time.
//
// Shared by the CUDA kernels (ktlegacy_gguf.cu) and by the host-side test of ktlegacy's suite, which
// compiles this header with a plain C++ compiler and compares every type with gguf-py's
// `gguf.quants.dequantize` (tests/test_gguf_linear.py). Written by ktlegacy from the block layouts
// (ggml's public format, as gguf-py documents it); no code is taken from another project.
//
// A block of QK values (32 or 256) is cut into QK/8 "chunks". Chunk c yields eight values: v[0..3]
// belong to the inputs x[o0 .. o0+3] of the block, v[4..7] to x[o1 .. o1+3]. Every layout below
// packs two runs of four such values into the same four bytes (low and high nibbles, or different
// bit planes), so one 32-bit load serves eight weights and two 8-byte loads of x serve them.
//
// Only instructions every arch from sm_70 on has are used: integer shifts/masks, fp32 FMA, fp16
// conversion. Blocks start at even byte offsets (every block size is even), so 16-bit loads are
// aligned; 32-bit values are assembled from two of them.
#pragma once

#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#include <cuda_fp16.h>
#define KTL_HD __host__ __device__ __forceinline__
#else
#define KTL_HD inline
#endif

namespace ktl {

// ggml type ids (ggml.h's enum ggml_type; GGUF stores these numbers)
enum GgmlType : int {
  Q4_0 = 2, Q5_0 = 6, Q8_0 = 8, Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, IQ4_XS = 23,
};

KTL_HD uint32_t ld2(const uint8_t* p) {
#ifdef __CUDA_ARCH__
  return *reinterpret_cast<const uint16_t*>(p);
#else
  uint16_t v;
  memcpy(&v, p, 2);
  return v;
#endif
}

KTL_HD uint32_t ld4(const uint8_t* p) { return ld2(p) | (ld2(p + 2) << 16); }

// IEEE binary16 bits -> float, exactly (subnormals included)
KTL_HD float h2f(uint32_t h) {
#ifdef __CUDA_ARCH__
  return __half2float(__ushort_as_half(static_cast<unsigned short>(h)));
#else
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do { man <<= 1; ++e; } while (!(man & 0x400u));
      bits = sign | (uint32_t)(127 - 15 - e) << 23 | (man & 0x3ffu) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | man << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
#endif
}

KTL_HD int sbyte(uint32_t word, int i) { return (int)(int8_t)(uint8_t)(word >> (8 * i)); }

// The 16 non-linear levels of IQ4_NL / IQ4_XS
#ifdef __CUDACC__
__constant__ int8_t kIq4nlDevice[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
#endif
static const int8_t kIq4nlHost[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
KTL_HD int iq4nl(int i) {
#ifdef __CUDA_ARCH__
  return kIq4nlDevice[i];
#else
  return kIq4nlHost[i];
#endif
}

// Q4_K / Q5_K: eight 6-bit (scale, min) pairs packed in 12 bytes
KTL_HD void scale_min_k4(const uint8_t* s, int j, int& sc, int& mn) {
  if (j < 4) {
    sc = s[j] & 63;
    mn = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// Q4_K / Q5_K block header {fp16 d, dmin; scales[12]}: the two sub-blocks of 64-value group g,
// value = d0 * q - n0 (low nibbles) and d1 * q - n1 (high nibbles)
KTL_HD void group_scales_k4(const uint8_t* b, int g, float& d0, float& d1, float& n0, float& n1) {
  const float d = h2f(ld2(b)), dmin = h2f(ld2(b + 2));
  int s0, m0, s1, m1;
  scale_min_k4(b + 4, 2 * g, s0, m0);
  scale_min_k4(b + 4, 2 * g + 1, s1, m1);
  d0 = d * (float)s0;
  d1 = d * (float)s1;
  n0 = dmin * (float)m0;
  n1 = dmin * (float)m1;
}

// Q3_K: sixteen 6-bit signed scales packed in 12 bytes (low nibbles in bytes 0-7, top bits in 8-11)
KTL_HD int scale_q3k(const uint8_t* s, int is) {
  int low = is < 8 ? (s[is] & 0xF) : (s[is - 8] >> 4);
  int high = (s[8 + (is & 3)] >> (2 * (is >> 2))) & 3;
  return (low | high << 4) - 32;
}

template <int T> struct Blk;

// {fp16 d; int8 qs[32]}
template <> struct Blk<Q8_0> {
  static constexpr int QK = 32, BYTES = 34;
  KTL_HD static void chunk(const uint8_t* b, int c, float* v, int& o0, int& o1) {
    const float d = h2f(ld2(b));
    const uint32_t a = ld4(b + 2 + 8 * c), e = ld4(b + 6 + 8 * c);
    o0 = 8 * c;
    o1 = o0 + 4;
    for (int i = 0; i < 4; ++i) {
      v[i] = d * sbyte(a, i);
      v[4 + i] = d * sbyte(e, i);
    }
  }
};

// {fp16 d; uint8 qs[16]}: value j = low nibble of qs[j], value j+16 = its high nibble
template <> struct Blk<Q4_0> {
  static constexpr int QK = 32, BYTES = 18;
  KTL_HD static void chunk(const uint8_t* b, int c, float* v, int& o0, int& o1) {
    const float d = h2f(ld2(b));
    const uint32_t q = ld4(b + 2 + 4 * c);
    o0 = 4 * c;
    o1 = o0 + 16;
    for (int i = 0; i < 4; ++i) {
      v[i] = d * (float)((int)((q >> (8 * i)) & 0xF) - 8);
      v[4 + i] = d * (float)((int)((q >> (8 * i + 4)) & 0xF) - 8);
    }
  }
};

// {fp16 d; uint32 qh; uint8 qs[16]}: fifth bit of value j in qh bit j
template <> struct Blk<Q5_0> {
  static constexpr int QK = 32, BYTES = 22;
  KTL_HD static void chunk(const uint8_t* b, int c, float* v, int& o0, int& o1) {
    const float d = h2f(ld2(b));
    const uint32_t qh = ld4(b + 2), q = ld4(b + 6 + 4 * c);
    o0 = 4 * c;
    o1 = o0 + 16;
    for (int i = 0; i < 4; ++i) {
      const int j = o0 + i;
      const int lo = (int)(((q >> (8 * i)) & 0xF) | (((qh >> j) & 1) << 4));
      const int hi = (int)(((q >> (8 * i + 4)) & 0xF) | (((qh >> (j + 16)) & 1) << 4));
      v[i] = d * (float)(lo - 16);
      v[4 + i] = d * (float)(hi - 16);
    }
  }
};

// {fp16 d, dmin; uint8 scales[12]; uint8 qs[128]}: four groups of 64 values; group g's bytes
// qs[32g..32g+31] hold values 64g+l (low nibble, sub-block 2g) and 64g+32+l (high, 2g+1)
template <> struct Blk<Q4_K> {
  static constexpr int QK = 256, BYTES = 144;
  KTL_HD static void chunk(const uint8_t* b, int c, float* v, int& o0, int& o1) {
    const int g = c >> 3, k = c & 7;
    float d0, d1, n0, n1;
    group_scales_k4(b, g, d0, d1, n0, n1);
    const uint32_t q = ld4(b + 16 + 32 * g + 4 * k);
    o0 = 64 * g + 4 * k;
    o1 = o0 + 32;
    for (int i = 0; i < 4; ++i) {
      v[i] = d0 * (float)((q >> (8 * i)) & 0xF) - n0;
      v[4 + i] = d1 * (float)((q >> (8 * i + 4)) & 0xF) - n1;
    }
  }
};

// {fp16 d, dmin; uint8 scales[12]; uint8 qh[32]; uint8 qs[128]}: Q4_K plus a fifth bit, value
// 64g+l's in qh[l] bit 2g, value 64g+32+l's in qh[l] bit 2g+1
template <> struct Blk<Q5_K> {
  static constexpr int QK = 256, BYTES = 176;
  KTL_HD static void chunk(const uint8_t* b, int c, float* v, int& o0, int& o1) {
    const int g = c >> 3, k = c & 7;
    float d0, d1, n0, n1;
    group_scales_k4(b, g, d0, d1, n0, n1);
    const uint32_t q = ld4(b + 48 + 32 * g + 4 * k), h = ld4(b + 16 + 4 * k);
    o0 = 64 * g + 4 * k;
    o1 = o0 + 32;
    for (int i = 0; i < 4; ++i) {
      const uint32_t lo = ((q >> (8 * i)) & 0xF) | (((h >> (8 * i + 2 * g)) & 1) << 4);
      const uint32_t hi = ((q >> (8 * i + 4)) & 0xF) | (((h >> (8 * i + 2 * g + 1)) & 1) << 4);
      v[i] = d0 * (float)lo - n0;
      v[4 + i] = d1 * (float)hi - n1;
    }
  }
};

// {uint8 ql[128]; uint8 qh[64]; int8 scales[16]; fp16 d}: two halves of 128 values; in half n,
// value 128n+32q+l takes the low (q<2) or high (q>=2) nibble of ql[64n+32(q&1)+l] and bits 2q..2q+1
// of qh[32n+l]; value v's scale is scales[v/16]
template <> struct Blk<Q6_K> {
  static constexpr int QK = 256, BYTES = 210;
  KTL_HD static void chunk(const uint8_t* b, int c, float* v, int& o0, int& o1) {
    const int n = c >> 4, r = c & 15, p = r >> 3, l0 = (r & 7) * 4;
    const float d = h2f(ld2(b + 208));
    const uint32_t ql = ld4(b + 64 * n + 32 * p + l0), qh = ld4(b + 128 + 32 * n + l0);
    o0 = 128 * n + 32 * p + l0;
    o1 = o0 + 64;
    const float d0 = d * (float)(int8_t)b[192 + (o0 >> 4)], d1 = d * (float)(int8_t)b[192 + (o1 >> 4)];
    for (int i = 0; i < 4; ++i) {
      const int lo = (int)(((ql >> (8 * i)) & 0xF) | (((qh >> (8 * i + 2 * p)) & 3) << 4));
      const int hi = (int)(((ql >> (8 * i + 4)) & 0xF) | (((qh >> (8 * i + 2 * p + 4)) & 3) << 4));
      v[i] = d0 * (float)(lo - 32);
      v[4 + i] = d1 * (float)(hi - 32);
    }
  }
};

// {uint8 hmask[32]; uint8 qs[64]; uint8 scales[12]; fp16 d}: value 128n+32j+16h+l takes bits 2j..2j+1
// of qs[32n+16h+l], minus 4 unless bit 4n+j of hmask[16h+l] is set, times scale 8n+2j+h
template <> struct Blk<Q3_K> {
  static constexpr int QK = 256, BYTES = 110;
  KTL_HD static void chunk(const uint8_t* b, int c, float* v, int& o0, int& o1) {
    const int n = c >> 4, r = c & 15, h = r >> 3, j = (r >> 2) & 1, l0 = (r & 3) * 4;
    const float d = h2f(ld2(b + 108));
    const uint32_t q = ld4(b + 32 + 32 * n + 16 * h + l0), hm = ld4(b + 16 * h + l0);
    o0 = 128 * n + 32 * j + 16 * h + l0;
    o1 = o0 + 64;  // bit plane j+2
    const float d0 = d * (float)scale_q3k(b + 96, 8 * n + 2 * j + h);
    const float d1 = d * (float)scale_q3k(b + 96, 8 * n + 2 * (j + 2) + h);
    for (int i = 0; i < 4; ++i) {
      const int lo = (int)((q >> (8 * i + 2 * j)) & 3) - (((hm >> (8 * i + 4 * n + j)) & 1) ? 0 : 4);
      const int hi = (int)((q >> (8 * i + 2 * j + 4)) & 3) - (((hm >> (8 * i + 4 * n + j + 2)) & 1) ? 0 : 4);
      v[i] = d0 * (float)lo;
      v[4 + i] = d1 * (float)hi;
    }
  }
};

// {uint8 scales[16]; uint8 qs[64]; fp16 d, dmin}: value 128n+32j+16h+l takes bits 2j..2j+1 of
// qs[32n+16h+l]; scale byte 8n+2j+h holds its 4-bit scale (low) and min (high)
template <> struct Blk<Q2_K> {
  static constexpr int QK = 256, BYTES = 84;
  KTL_HD static void chunk(const uint8_t* b, int c, float* v, int& o0, int& o1) {
    const int n = c >> 4, r = c & 15, h = r >> 3, j = (r >> 2) & 1, l0 = (r & 3) * 4;
    const float d = h2f(ld2(b + 80)), dmin = h2f(ld2(b + 82));
    const uint32_t q = ld4(b + 16 + 32 * n + 16 * h + l0);
    o0 = 128 * n + 32 * j + 16 * h + l0;
    o1 = o0 + 64;
    const int sa = b[8 * n + 2 * j + h], sb = b[8 * n + 2 * (j + 2) + h];
    const float da = d * (float)(sa & 0xF), ma = dmin * (float)(sa >> 4);
    const float db = d * (float)(sb & 0xF), mb = dmin * (float)(sb >> 4);
    for (int i = 0; i < 4; ++i) {
      v[i] = da * (float)((q >> (8 * i + 2 * j)) & 3) - ma;
      v[4 + i] = db * (float)((q >> (8 * i + 2 * j + 4)) & 3) - mb;
    }
  }
};

// {fp16 d; uint16 scales_h; uint8 scales_l[4]; uint8 qs[128]}: eight sub-blocks of 32 with 6-bit
// scales; in sub-block s, value l (<16) is the low nibble of qs[16s+l], value 16+l its high nibble,
// each a level of the non-linear IQ4_NL grid
template <> struct Blk<IQ4_XS> {
  static constexpr int QK = 256, BYTES = 136;
  KTL_HD static void chunk(const uint8_t* b, int c, float* v, int& o0, int& o1) {
    const int s = c >> 2, k = c & 3;
    const float d = h2f(ld2(b));
    const uint32_t sh = ld2(b + 2);
    const int ls = ((b[4 + (s >> 1)] >> (4 * (s & 1))) & 0xF) | (((sh >> (2 * s)) & 3) << 4);
    const float dl = d * (float)(ls - 32);
    const uint32_t q = ld4(b + 8 + 16 * s + 4 * k);
    o0 = 32 * s + 4 * k;
    o1 = o0 + 16;
    for (int i = 0; i < 4; ++i) {
      v[i] = dl * (float)iq4nl((q >> (8 * i)) & 0xF);
      v[4 + i] = dl * (float)iq4nl((q >> (8 * i + 4)) & 0xF);
    }
  }
};

// Calls F::template run<T>(args...) for a runtime type id; returns false for an unsupported type.
#define KTL_GGUF_TYPES(X) X(Q4_0) X(Q5_0) X(Q8_0) X(Q2_K) X(Q3_K) X(Q4_K) X(Q5_K) X(Q6_K) X(IQ4_XS)

KTL_HD int values_per_block(int type) {
#define KTL_QK(T) if (type == T) return Blk<T>::QK;
  KTL_GGUF_TYPES(KTL_QK)
#undef KTL_QK
  return 0;
}

KTL_HD int bytes_per_block(int type) {
#define KTL_BYTES(T) if (type == T) return Blk<T>::BYTES;
  KTL_GGUF_TYPES(KTL_BYTES)
#undef KTL_BYTES
  return 0;
}

}  // namespace ktl
