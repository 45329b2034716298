//! Credentials kept out of the config file: `auth.keys_file`, `auth.admin_token_sha256_file` and
//! `worker.token_sha256_file` name files (on Kubernetes, mounted Secrets) read when the config is, and
//! again on every reload, so that a rotated Secret takes effect on SIGHUP without a restart.

use std::path::Path;

use serde::Deserialize;

use super::{ConfigError, FileConfig, KeySection, err};

/// The contents of `auth.keys_file`: `[[keys]]` tables, as `[[auth.keys]]` in the config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    keys: Vec<KeySection>,
}

impl FileConfig {
    /// Reads the credential files the config names into the values they stand for.
    pub(super) fn read_secret_files(&mut self) -> Result<(), ConfigError> {
        if let Some(path) = &self.auth.keys_file {
            let text = read("auth.keys_file", path)?;
            let file: KeysFile = toml::from_str(&text).map_err(|e| {
                err(
                    "auth.keys_file",
                    format!(
                        "{}: {}; it holds [[keys]] tables as [[auth.keys]] in the config",
                        path.display(),
                        e.message()
                    ),
                )
            })?;
            self.auth.keys.extend(file.keys);
        }
        if let Some(path) = &self.auth.admin_token_sha256_file {
            if self.auth.admin_token_sha256.is_some() {
                return Err(both("auth.admin_token_sha256"));
            }
            self.auth.admin_token_sha256 = Some(read("auth.admin_token_sha256_file", path)?.trim().to_string());
        }
        if let Some(path) = &self.worker.token_sha256_file {
            if self.worker.token_sha256.is_some() {
                return Err(both("worker.token_sha256"));
            }
            self.worker.token_sha256 = Some(read("worker.token_sha256_file", path)?.trim().to_string());
        }
        Ok(())
    }
}

fn read(key: &str, path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| err(key, format!("cannot read {}: {e}", path.display())))
}

fn both(key: &str) -> ConfigError {
    err(
        key,
        format!("set either {key} or {key}_file, not both: which one holds the credential?"),
    )
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ferroserve-secrets-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    const HASH: &str = "e49052cb77a35e3ebf86f7d184651dbf07b0fc8707d8ecb748fbf759b0a1d129";

    #[test]
    fn credential_files_fill_the_keys_they_stand_for() {
        let dir = scratch("fill");
        std::fs::write(
            dir.join("keys.toml"),
            format!("[[keys]]\ntenant = \"acme\"\nkey_sha256 = \"{HASH}\"\nrequests_per_second = 5.0\n"),
        )
        .unwrap();
        std::fs::write(dir.join("admin"), format!("{HASH}\n")).unwrap();
        std::fs::write(dir.join("worker"), HASH).unwrap();
        let config = dir.join("c.toml");
        std::fs::write(
            &config,
            format!(
                "[auth]\nkeys_file = \"{0}/keys.toml\"\nadmin_token_sha256_file = \"{0}/admin\"\n\
                 [[auth.keys]]\ntenant = \"inline\"\nkey_sha256 = \"{HASH}\"\n\
                 [worker]\ntoken_sha256_file = \"{0}/worker\"\n",
                dir.display()
            ),
        )
        .unwrap();
        let file = FileConfig::load(&config, true).unwrap();
        let tenants: Vec<&str> = file.auth.keys.iter().map(|k| k.tenant.as_str()).collect();
        assert_eq!(tenants, ["inline", "acme"]);
        assert_eq!(file.auth.admin_token_sha256.as_deref(), Some(HASH));
        assert_eq!(file.worker.token_sha256.as_deref(), Some(HASH));
        file.validate().expect("the filled config is valid");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_missing_or_malformed_file_or_both_forms_name_the_key() {
        let dir = scratch("bad");
        let load = |text: &str| {
            let config = dir.join("c.toml");
            std::fs::write(&config, text).unwrap();
            FileConfig::load(&config, true).unwrap_err()
        };
        let e = load("[auth]\nkeys_file = \"/nonexistent/keys.toml\"\n");
        assert_eq!(e.key, "auth.keys_file");
        assert!(e.message.contains("/nonexistent/keys.toml"), "{e:?}");
        std::fs::write(dir.join("k.toml"), "[[keys]]\ntenant = \"a\"\nkey_sha = \"x\"\n").unwrap();
        let e = load(&format!("[auth]\nkeys_file = \"{}/k.toml\"\n", dir.display()));
        assert_eq!(e.key, "auth.keys_file");
        assert!(e.message.contains("key_sha"), "names the unknown field: {e:?}");
        std::fs::write(dir.join("a"), HASH).unwrap();
        let e = load(&format!(
            "[auth]\nadmin_token_sha256 = \"{HASH}\"\nadmin_token_sha256_file = \"{}/a\"\n",
            dir.display()
        ));
        assert_eq!(e.key, "auth.admin_token_sha256");
        let _ = std::fs::remove_dir_all(dir);
    }
}
