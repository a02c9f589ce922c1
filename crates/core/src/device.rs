//! The one device helper: `cpu` or `cuda:N`, the latter only in builds with the `cuda` feature.

use crate::{Error, Result};
use candle_core::Device;

/// Parses `cpu`, `cuda` (= `cuda:0`) or `cuda:N` into a candle device.
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim();
    if spec.eq_ignore_ascii_case("cpu") {
        return Ok(Device::Cpu);
    }
    let ordinal = match spec.strip_prefix("cuda") {
        Some("") => 0,
        Some(rest) => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                Error::Device(format!(
                    "invalid device '{spec}': expected cpu, cuda or cuda:N"
                ))
            })?,
        None => {
            return Err(Error::Device(format!(
                "invalid device '{spec}': expected cpu, cuda or cuda:N"
            )))
        }
    };
    cuda_device(ordinal)
}

#[cfg(feature = "cuda")]
fn cuda_device(ordinal: usize) -> Result<Device> {
    Device::new_cuda(ordinal).map_err(|e| {
        Error::Device(format!(
            "cannot open cuda:{ordinal}: {}",
            crate::error::one_line(&e.to_string())
        ))
    })
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(ordinal: usize) -> Result<Device> {
    Err(Error::Device(format!(
        "device cuda:{ordinal} needs a CUDA build: rebuild with `cargo build --release --features cuda` \
         (see README, CPU vs CUDA)"
    )))
}

/// A short name for logs and reports.
pub fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(_) => "cuda".to_string(),
        Device::Metal(_) => "metal".to_string(),
    }
}

/// The number of threads candle's CPU kernels use (RAYON_NUM_THREADS or the core count).
pub fn cpu_threads() -> usize {
    candle_core::utils::get_num_threads()
}

/// Peak resident set size of this process (Linux `VmHWM`), for benchmarks; `None` elsewhere.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Available memory (Linux `MemAvailable`), for memory plans; `None` elsewhere.
pub fn available_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_rejects_garbage() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(parse_device("CPU").unwrap().is_cpu());
        let err = parse_device("tpu:0").unwrap_err().to_string();
        assert!(err.contains("expected cpu"), "{err}");
        assert!(parse_device("cuda:x").is_err());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_feature_says_how_to_build() {
        let err = parse_device("cuda:0").unwrap_err().to_string();
        assert!(err.contains("--features cuda"), "{err}");
        assert!(!err.contains('\n'));
    }
}
