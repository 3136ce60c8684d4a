// Int8 activations for Q8_0 / Q4_0 / Q4_1 weights (opt-in: --quantized-activations int8); see
// quant_a8.cpp. Plain C++ only (no torch): the VNNI translation unit includes it under a
// `#pragma GCC target`, and must not emit any inline function another unit could share.
#pragma once

#include <cstdint>

namespace quire_quant {

// Added to a quant_type passed to quant_linear (together with the format's type id, never with
// kInterleavedFlag): x is quantized to int8 per 32-element block inside the call and the weight is
// in the quad layout. Like the interleaved layout, 8 output rows per group (zero rows pad to a
// multiple of 8) and, per group and block index, each f16 header field of rows 0..7 (16 bytes per
// field); then the quant bytes in runs of 4 per row: byte 32 * i + 4 * r + t is quant byte
// 4 * i + t of row r. So one 32-byte load holds 4 consecutive quant bytes of each of the 8 rows,
// the operand shape of vpdpbusd (4 byte products summed into each 32-bit lane, one lane per row).
// quire/models/quant_linear.py builds it (interleave_rows with run=4).
constexpr int64_t kInt8ActivationsFlag = 512;

// x quantized per row and 32-element block, as Q8_0 quantizes weights but rounding half to even:
// d = max|x| / 127, q = round(x / d) via x * (1 / d) (0 where d == 0). The Q4 formats also need
// the block's sum of q (their offset term: m * d * sum(q) for Q4_1, -8 * sum(q) for Q4_0).
struct Int8Rows {
  const int8_t* q;      // [rows][k]
  const float* d;       // [rows][k / 32]
  const int32_t* qsum;  // [rows][k / 32]
  const float* dsum;    // [rows][k / 32]: d * qsum in fp32
  int64_t k;
};

// One call's operands: groups [g0, g1) of 8 output rows against every row of x.
struct A8Problem {
  int64_t type;  // kQ8_0, kQ4_0 or kQ4_1
  Int8Rows x;
  int64_t m;     // rows of x
  const uint8_t* w;  // quad layout, 8 * row_bytes per group
  int64_t row_bytes;
  const float* bias;  // [n] or nullptr
  float* y;           // [m][ldy]
  int64_t ldy;
};

// The ISA variants of the group loop, each in its own translation unit: AVX2 (maddubs + madd,
// quant_a8_avx2.cpp) and VNNI (vpdpbusd, quant_a8_vnni.cpp: AVX512-VNNI in the AVX-512 tiers,
// AVX-VNNI in the avx2 tier). Defined only where the tier's flags allow them.
void a8_groups_avx2(const A8Problem& p, int64_t g0, int64_t g1);
void a8_groups_vnni(const A8Problem& p, int64_t g0, int64_t g1);
// Whether a8_groups_vnni exists in this build and the CPU runs it.
bool a8_vnni_available();

}  // namespace quire_quant
