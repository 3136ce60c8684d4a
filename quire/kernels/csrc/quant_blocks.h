// GGUF block formats: sizes, and exact scalar decoding of one block to fp32.
//
// The decoders reproduce gguf-py's dequantize (quire/models/quant_linear.py mirrors it in torch)
// bit for bit. Every product they form is exact in fp32: an f16 scale has an 11-bit significand,
// the 6-bit sub-block scales and the <= 6-bit quants add at most 13 more bits, 24 in all. So each
// output carries exactly one rounding (the final add of the offset, where there is one), whatever
// the order of the products, and a compiler that contracts `a * b + c` into an FMA cannot change
// the result: the rounding of an exact product plus c is the FMA's rounding.
#pragma once

#include <cstdint>
#include <cstring>

namespace quire_quant {

// GGML type ids (gguf.GGMLQuantizationType), as quant_linear.py's QUANT_TYPES passes them.
enum QuantType : int64_t { kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14 };

// Added to a quant_type passed to quant_linear: the weight is in the interleaved layout, 8 output
// rows per group (rows padded with zero bytes to a multiple of 8). Per group and block index, the
// 8 rows' blocks become: each f16 field of the block header for rows 0..7 (16 bytes per field),
// then quant byte j of rows 0..7 for every j (8 bytes per j). A permutation of the file's bytes,
// no expansion; quire/models/quant_linear.py builds and undoes it.
constexpr int64_t kInterleavedFlag = 256;

// Header bytes (the f16 fields before the quants) of the formats with an interleaved layout, 0 otherwise.
constexpr int64_t interleave_head_bytes(int64_t type) {
  return type == kQ4_1 ? 4 : (type == kQ4_0 || type == kQ8_0) ? 2 : 0;
}

struct BlockFormat {
  int64_t type;
  int64_t elems;  // weights per block
  int64_t bytes;  // bytes per block
  void (*decode)(const uint8_t* block, float* out, int64_t stride);  // exact: out[i * stride]
};

// IEEE half to float, exact for every input (normals, subnormals, infinities, NaN payloads).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1Fu;
  uint32_t mantissa = h & 0x3FFu;
  uint32_t bits;
  if (exponent == 0x1F) {
    bits = sign | 0x7F800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal: normalise the mantissa
    exponent = 113;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float load_half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return half_to_float(h);
}

inline void decode_q8_0(const uint8_t* b, float* out, int64_t stride) {
  const float d = load_half(b);
  for (int i = 0; i < 32; ++i) out[i * stride] = static_cast<float>(static_cast<int8_t>(b[2 + i])) * d;
}

// Q4_0 / Q4_1: byte i holds element i in its low nibble and element i + 16 in its high nibble.
inline void decode_q4_0(const uint8_t* b, float* out, int64_t stride) {
  const float d = load_half(b);
  for (int i = 0; i < 16; ++i) {
    out[i * stride] = d * static_cast<float>((b[2 + i] & 0x0F) - 8);
    out[(i + 16) * stride] = d * static_cast<float>((b[2 + i] >> 4) - 8);
  }
}

inline void decode_q4_1(const uint8_t* b, float* out, int64_t stride) {
  const float d = load_half(b), m = load_half(b + 2);
  for (int i = 0; i < 16; ++i) {
    out[i * stride] = d * static_cast<float>(b[4 + i] & 0x0F) + m;
    out[(i + 16) * stride] = d * static_cast<float>(b[4 + i] >> 4) + m;
  }
}

// Q4_K / Q5_K: 8 sub-blocks of 32, each with a 6-bit scale and a 6-bit min packed into 12 bytes:
// sub-blocks 0-3 in the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); sub-blocks 4-7 keep their
// low 4 bits in bytes 8-11 (scale low nibble, min high nibble) and their top 2 bits in the spare
// top bits of bytes 0-3 (scales) and 4-7 (mins).
inline void k_scale_min(const uint8_t* s, int j, float* scale, float* min) {
  if (j < 4) {
    *scale = static_cast<float>(s[j] & 0x3F);
    *min = static_cast<float>(s[j + 4] & 0x3F);
  } else {
    *scale = static_cast<float>((s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4));
    *min = static_cast<float>((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
  }
}

// Sub-block j's quants: group j / 2 of 32 bytes, low nibbles for even j and high for odd; Q5_K adds
// bit j of qh[l] as bit 4 of element l.
inline void decode_k_affine(const uint8_t* b, const uint8_t* qh, const uint8_t* qs, float* out, int64_t stride) {
  const float d = load_half(b), dmin = load_half(b + 2);
  for (int j = 0; j < 8; ++j) {
    float sc, mn;
    k_scale_min(b + 4, j, &sc, &mn);
    const float scale = d * sc, offset = dmin * mn;
    const uint8_t* group = qs + (j / 2) * 32;
    const int shift = (j % 2) * 4;
    for (int l = 0; l < 32; ++l) {
      int q = (group[l] >> shift) & 0x0F;
      if (qh != nullptr) q |= ((qh[l] >> j) & 1) << 4;
      out[(j * 32 + l) * stride] = scale * static_cast<float>(q) - offset;
    }
  }
}

inline void decode_q4_k(const uint8_t* b, float* out, int64_t stride) {
  decode_k_affine(b, nullptr, b + 16, out, stride);
}
inline void decode_q5_k(const uint8_t* b, float* out, int64_t stride) {
  decode_k_affine(b, b + 16, b + 48, out, stride);
}

// Q6_K: two halves of 128. In half h, ql[h*64 + l] holds element l (low nibble) and 64 + l (high);
// qh[h*32 + l] holds the top 2 bits of elements 32s + l at bits 2s (s = 0..3). Quants are biased by
// 32; each run of 16 elements has a signed 8-bit scale, times the block's f16 d.
inline void decode_q6_k(const uint8_t* b, float* out, int64_t stride) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
  const float d = load_half(b + 208);
  for (int h = 0; h < 2; ++h) {
    for (int e = 0; e < 128; ++e) {
      const int low = (ql[h * 64 + (e % 64)] >> ((e / 64) * 4)) & 0x0F;
      const int high = (qh[h * 32 + (e % 32)] >> ((e / 32) * 2)) & 0x03;
      const int index = h * 128 + e;
      out[index * stride] = (d * static_cast<float>(scales[index / 16])) * static_cast<float>((low | (high << 4)) - 32);
    }
  }
}

// The formats, looked up by GGML type id; nullptr for one quire does not know.
inline const BlockFormat* find_format(int64_t type) {
  static const BlockFormat kFormats[] = {
      {kQ4_0, 32, 18, decode_q4_0},   {kQ4_1, 32, 20, decode_q4_1},   {kQ8_0, 32, 34, decode_q8_0},
      {kQ4_K, 256, 144, decode_q4_k}, {kQ5_K, 256, 176, decode_q5_k}, {kQ6_K, 256, 210, decode_q6_k},
  };
  for (const BlockFormat& format : kFormats)
    if (format.type == type) return &format;
  return nullptr;
}

}  // namespace quire_quant
