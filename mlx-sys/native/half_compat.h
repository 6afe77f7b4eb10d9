/* mlx-c declares its float16/bfloat16 scalar accessors only where the C compiler has
 * __fp16/__bf16 (aarch64). mlx-rs calls them on every target, so on other targets this
 * header declares them over the raw 16-bit patterns; compat.cpp implements them with
 * MLX's own half types. The Rust side sees `float16_t` as a transparent u16 newtype and
 * `bfloat16_t` as u16, as bindgen produces on aarch64. */
#ifndef MLX_SYS_HALF_COMPAT_H
#define MLX_SYS_HALF_COMPAT_H

#include "mlx/c/array.h"

#ifdef __cplusplus
extern "C" {
#endif

#ifndef HAS_FLOAT16
#include <stdint.h>
typedef uint16_t float16_t;
int mlx_array_item_float16(float16_t* res, const mlx_array arr);
const float16_t* mlx_array_data_float16(const mlx_array arr);
#endif

#ifndef HAS_BFLOAT16
#include <stdint.h>
typedef uint16_t bfloat16_t;
int mlx_array_item_bfloat16(bfloat16_t* res, const mlx_array arr);
const bfloat16_t* mlx_array_data_bfloat16(const mlx_array arr);
#endif

#ifdef __cplusplus
}
#endif

#endif
