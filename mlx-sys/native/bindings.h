/* The header bindgen reads: all of mlx-c, plus the half accessors on targets where
 * mlx-c leaves them out. */
#include "mlx/c/mlx.h"
#include "half_compat.h"
