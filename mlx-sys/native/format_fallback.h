/* Force-included into every mlx-c translation unit.
 *
 * mlx-c 0.7.0 formats five error messages with std::format (mlx/c/private/io.h), which
 * libstdc++ only has from GCC 13. On older standard libraries this header provides the
 * subset those messages use: positional "{}" fields, each written with operator<<. */
#ifndef MLX_SYS_FORMAT_FALLBACK_H
#define MLX_SYS_FORMAT_FALLBACK_H

#ifdef __cplusplus
#include <version>
#if !defined(__cpp_lib_format)
#include <sstream>
#include <string>
#include <string_view>

namespace std {
template <class... Args>
string format(string_view fmt, const Args&... args) {
  ostringstream out;
  size_t pos = 0;
  auto field = [&](const auto& arg) {
    size_t open = fmt.find("{}", pos);
    if (open == string_view::npos) {
      return;
    }
    out << fmt.substr(pos, open - pos) << arg;
    pos = open + 2;
  };
  (field(args), ...);
  out << fmt.substr(pos);
  return out.str();
}
} // namespace std
#endif
#endif

#endif
