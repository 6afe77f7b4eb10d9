//! What this process runs on: the MLX version, the default device and the BLAS in use.

use std::ffi::{CStr, CString};

/// The version of the MLX library this process loaded, e.g. `"0.32.2"`.
pub fn mlx_version() -> String {
    // SAFETY: mlx_string is created, read and freed here; mlx_version fills it.
    unsafe {
        let mut text = mlx_sys::mlx_string_new();
        let status = mlx_sys::mlx_version(&mut text);
        let version = if status == 0 {
            CStr::from_ptr(mlx_sys::mlx_string_data(text))
                .to_string_lossy()
                .into_owned()
        } else {
            String::from("unknown")
        };
        mlx_sys::mlx_string_free(text);
        version
    }
}

/// MLX's default device as text, e.g. `"cpu"` or `"gpu"`.
pub fn default_device() -> String {
    match mlx_rs::Device::try_default().and_then(|d| d.get_type()) {
        Ok(mlx_rs::DeviceType::Cpu) => "cpu".to_owned(),
        Ok(mlx_rs::DeviceType::Gpu) => "gpu".to_owned(),
        Err(_) => "unknown".to_owned(),
    }
}

/// The shared library that provides `cblas_sgemm` to MLX in this process, found the
/// way the dynamic loader resolves it (`None` where MLX links BLAS statically).
pub fn blas_library() -> Option<String> {
    let symbol = CString::new("cblas_sgemm").ok()?;
    // SAFETY: dlsym/dladdr only read the loader's tables; Dl_info is plain data.
    unsafe {
        let address = libc::dlsym(libc::RTLD_DEFAULT, symbol.as_ptr());
        if address.is_null() {
            return None;
        }
        let mut info: libc::Dl_info = std::mem::zeroed();
        if libc::dladdr(address, &mut info) == 0 || info.dli_fname.is_null() {
            return None;
        }
        Some(
            CStr::from_ptr(info.dli_fname)
                .to_string_lossy()
                .into_owned(),
        )
    }
}

/// A short name for [`blas_library`]: `"OpenBLAS"`, `"reference"` (the slow BLAS bundled
/// with the MLX wheel), `"Accelerate"`, or the library's file name.
pub fn blas_name() -> String {
    let Some(path) = blas_library() else {
        return "none found".to_owned();
    };
    let file = path.rsplit('/').next().unwrap_or(&path).to_owned();
    if file.contains("openblas") {
        "OpenBLAS".to_owned()
    } else if file.starts_with("libblas") {
        "reference".to_owned()
    } else if path.contains("Accelerate") {
        "Accelerate".to_owned()
    } else {
        file
    }
}
