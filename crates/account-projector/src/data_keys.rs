//! Where the key-encryption keys come from: `DATA_KEYS`, a file (`DATA_KEYS_FILE`), or, for the
//! quickstart, a key generated on first start into the user's configuration directory.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use sealing::KeyRing;
use store::keys::Vault;

/// Builds the vault: keys from `data_keys` (the variable), else from `file`, else none with
/// `allow_plaintext` (new values stored in plaintext), else from [`default_file`], generated
/// there if missing, with a warning.
pub fn vault(
    data_keys: Option<&str>,
    file: Option<&Path>,
    allow_plaintext: bool,
) -> anyhow::Result<Vault> {
    if let Some(list) = data_keys.filter(|l| !l.trim().is_empty()) {
        return Ok(Vault::new(KeyRing::parse(list)?));
    }
    if let Some(path) = file {
        return read(path);
    }
    if allow_plaintext {
        tracing::warn!(
            "ALLOW_PLAINTEXT_LOG=true and no DATA_KEYS: new events are stored unencrypted and cannot be erased"
        );
        return Ok(Vault::plaintext());
    }
    let Some(path) = default_file() else {
        anyhow::bail!(
            "set DATA_KEYS (comma-separated base64 32-byte keys, newest first; e.g. `openssl rand -base64 32`)"
        );
    };
    if !path.exists() {
        generate(&path)?;
        tracing::warn!(path = %path.display(),
            "no DATA_KEYS: generated a key-encryption key into this file; production keeps DATA_KEYS elsewhere (losing the key loses every body)");
    }
    read(&path)
}

/// `$XDG_CONFIG_HOME/account-projector/data-keys`, or `~/.config/account-projector/data-keys`.
pub fn default_file() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|home| PathBuf::from(home).join(".config"))
        })?;
    Some(base.join("account-projector").join("data-keys"))
}

fn read(path: &Path) -> anyhow::Result<Vault> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("could not read the data keys file {}", path.display()))?;
    let list: Vec<&str> = text
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .flat_map(|line| line.split(','))
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .collect();
    let ring = KeyRing::parse(&list.join(","))
        .with_context(|| format!("the data keys file {}", path.display()))?;
    Ok(Vault::new(ring))
}

fn generate(path: &Path) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("could not create {}", dir.display()))?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("could not create the data keys file {}", path.display()))?;
    writeln!(
        file,
        "# account-projector key-encryption keys (DATA_KEYS), newest first. Losing them loses every\n# event body. Generated on first start; production keeps DATA_KEYS elsewhere.\n{}",
        KeyRing::generate_key()
    )?;
    file.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_from_the_variable_the_file_or_a_generated_file() {
        let dir = std::env::temp_dir().join(format!("ap-keys-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = KeyRing::generate_key();
        assert!(vault(Some(&key), None, false).unwrap().encrypts());
        assert!(vault(Some("not base64"), None, false).is_err());
        let file = dir.join("keys");
        std::fs::write(&file, format!("# comment\n{key}\n")).unwrap();
        assert!(vault(None, Some(&file), false).unwrap().encrypts());
        assert!(!vault(None, None, true).unwrap().encrypts());
        let generated = dir.join("config").join("data-keys");
        generate(&generated).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&generated).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        assert!(read(&generated).unwrap().encrypts());
        assert!(generate(&generated).is_err(), "never overwrites a key");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
