/* Pieces mlx-rs needs on Linux that mlx-c 0.7.0 leaves out there; see half_compat.h. */
#include <cstdint>
#include <cstring>
#include <ctime>
#include <exception>

#include "half_compat.h"
#include "mlx/c/error.h"
#include "mlx/c/private/mlx.h"

namespace {

template <typename Half>
int item_bits(uint16_t* res, const mlx_array arr) {
  try {
    Half value = mlx_array_get_(arr).item<Half>();
    std::memcpy(res, &value, sizeof(uint16_t));
  } catch (std::exception& e) {
    mlx_error(e.what());
    return 1;
  }
  return 0;
}

template <typename Half>
const uint16_t* data_bits(const mlx_array arr) {
  try {
    static_assert(sizeof(Half) == sizeof(uint16_t));
    return reinterpret_cast<const uint16_t*>(mlx_array_get_(arr).data<Half>());
  } catch (std::exception& e) {
    mlx_error(e.what());
    return nullptr;
  }
}

} // namespace

#ifndef HAS_FLOAT16
extern "C" int mlx_array_item_float16(float16_t* res, const mlx_array arr) {
  return item_bits<mlx::core::float16_t>(res, arr);
}
extern "C" const float16_t* mlx_array_data_float16(const mlx_array arr) {
  return data_bits<mlx::core::float16_t>(arr);
}
#endif

#ifndef HAS_BFLOAT16
extern "C" int mlx_array_item_bfloat16(bfloat16_t* res, const mlx_array arr) {
  return item_bits<mlx::core::bfloat16_t>(res, arr);
}
extern "C" const bfloat16_t* mlx_array_data_bfloat16(const mlx_array arr) {
  return data_bits<mlx::core::bfloat16_t>(arr);
}
#endif

#ifndef __APPLE__
/* mlx-rs seeds `RandomState::new` from macOS's mach_approximate_time (through the
 * mach-sys crate, which only declares it). A monotonic nanosecond clock serves the same
 * purpose here. */
extern "C" uint64_t mach_approximate_time(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull +
      static_cast<uint64_t>(ts.tv_nsec);
}
#endif
