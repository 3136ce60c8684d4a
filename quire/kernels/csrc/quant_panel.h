// The panel path of quant_linear (more rows of x than the direct path serves); see quant_panel.cpp.
#pragma once

#include <cstdint>

#include "quant_blocks.h"

namespace quire_quant {

// y [m_dim, n_dim] = x [m_dim, k_dim] times the dequantized weight (raw: n_dim rows of k_dim /
// format.elems blocks), transposed, plus bias (may be null).
void quant_panel_linear(const BlockFormat& format, const float* x, int64_t m_dim, int64_t k_dim, const uint8_t* raw,
                        int64_t n_dim, const float* bias, float* y);

}  // namespace quire_quant
