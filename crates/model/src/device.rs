//! Parsing `--device` into a Candle device.

use candle_core::Device;

use crate::ModelError;

/// Where the model runs: `cpu` or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The host CPU, all cores.
    Cpu,
    /// The CUDA GPU with this ordinal.
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| format!("unknown device `{s}`; use `cpu` or `cuda:N` (e.g. cuda:0)")),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// Checks, cheaply and without touching hardware, that this build has the backend the device needs.
    pub fn check_built(self) -> Result<(), String> {
        match self {
            DeviceSpec::Cuda(n) if !candle_core::utils::cuda_is_available() => Err(format!(
                "device cuda:{n} requested, but this ferroserve was not built with CUDA; \
                 rebuild with `--features cuda` or use `--device cpu`"
            )),
            _ => Ok(()),
        }
    }

    /// Opens the device, failing clearly when this binary was built without the needed backend.
    pub fn open(self) -> Result<Device, ModelError> {
        self.check_built().map_err(ModelError::Device)?;
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => {
                Device::new_cuda(n).map_err(|e| ModelError::Device(format!("cannot open cuda:{n}: {e}")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_cuda() {
        assert_eq!("cpu".parse::<DeviceSpec>(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda:1".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(1)));
        assert!("tpu".parse::<DeviceSpec>().unwrap_err().contains("cuda:N"));
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_so() {
        let err = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert!(err.contains("not built with CUDA"), "{err}");
    }
}
