// The panel path of quant_linear (more rows of x than the direct path serves); see quant_panel.cpp.
#pragma once

#include <cstdint>

#include "quant_blocks.h"

namespace quire_quant {

// y [m_dim, n_dim] = x [m_dim, k_dim] times the dequantized weight (raw: n_dim rows of k_dim /
// format.elems blocks), transposed, plus bias (may be null). interleaved: raw is in the layout of
// kInterleavedFlag (n_dim a multiple of 8; AVX2 builds, Q8_0 / Q4_0 / Q4_1 only).
void quant_panel_linear(const BlockFormat& format, bool interleaved, const float* x, int64_t m_dim, int64_t k_dim, const uint8_t* raw,
                        int64_t n_dim, const float* bias, float* y);

}  // namespace quire_quant
