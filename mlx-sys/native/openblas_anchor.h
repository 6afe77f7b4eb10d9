/* Force-included into every mlx-c translation unit when OpenBLAS is linked.
 *
 * MLX calls cblas_sgemm and LAPACK from libmlx.so, which the wheel links to its bundled
 * reference BLAS. For OpenBLAS to be resolved first, the executable itself must list
 * libopenblas as needed, but rustc links with --as-needed and --gc-sections, which drop a
 * library that no kept section of the executable refers to. This reference, in a section
 * marked `retain` in every mlx-c object that gets linked, keeps it. */
#ifndef MLX_SYS_OPENBLAS_ANCHOR_H
#define MLX_SYS_OPENBLAS_ANCHOR_H
#ifdef __cplusplus
extern "C" int openblas_get_num_threads(void);
namespace {
[[gnu::used, gnu::retain]] int (*const mlx_sys_openblas_anchor)(void) = &openblas_get_num_threads;
}
#endif
#endif
