//! Secrets on the command line: values whose `Debug` never shows them, and lists of them read
//! from a file or standard input, so that they need not appear in `ps`.

use std::io::Read;
use std::path::Path;

/// A secret value (a webhook secret, an API token, a database URL with its password). `Debug`
/// shows `***` (a database URL: with its password masked).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// A database URL: `Debug` masks its password.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(pub String);

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&store::redacted_url(&self.0))
    }
}

/// Reads a list of secrets from `path`, or from standard input when `path` is `-`: entries
/// separated by commas or line breaks, surrounding whitespace trimmed, blank lines skipped.
/// Errors name the file, never its content.
pub fn read_list(path: &Path) -> anyhow::Result<Vec<Secret>> {
    let text = read_text(path)?;
    let entries: Vec<Secret> = text
        .split([',', '\n'])
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(Secret::new)
        .collect();
    if entries.is_empty() {
        anyhow::bail!("{} holds no secret", shown(path));
    }
    Ok(entries)
}

/// Reads one secret from `path` (or standard input for `-`), trimmed.
pub fn read_one(path: &Path) -> anyhow::Result<Secret> {
    let text = read_text(path)?;
    match text.trim() {
        "" => anyhow::bail!("{} holds no secret", shown(path)),
        value => Ok(Secret::new(value)),
    }
}

/// Refuses a list with an empty entry (`a,,b`, a comma at an end, `API_TOKENS=","`): no secret
/// at all, not a secret that is empty. `what` names the list in the sentence.
pub fn refuse_empty_entries<S: AsRef<str>>(what: &str, entries: &[S]) -> anyhow::Result<()> {
    if entries.iter().any(|e| e.as_ref().trim().is_empty()) {
        anyhow::bail!("{what} has an empty entry (two commas in a row, or a comma at an end)");
    }
    Ok(())
}

/// Larger files are surely not a list of secrets.
const MAX_SECRETS_FILE: u64 = 64 * 1024;

fn read_text(path: &Path) -> anyhow::Result<String> {
    let mut text = String::new();
    let read = if path == Path::new("-") {
        std::io::stdin()
            .take(MAX_SECRETS_FILE + 1)
            .read_to_string(&mut text)
    } else {
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_SECRETS_FILE + 1).read_to_string(&mut text))
    };
    read.map_err(|e| anyhow::anyhow!("could not read {}: {e}", shown(path)))?;
    if text.len() as u64 > MAX_SECRETS_FILE {
        anyhow::bail!("{} is larger than {MAX_SECRETS_FILE} bytes", shown(path));
    }
    Ok(text)
}

fn shown(path: &Path) -> String {
    if path == Path::new("-") {
        "standard input".into()
    } else {
        path.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_no_secret() {
        assert_eq!(format!("{:?}", Secret::new("s3cret")), "***");
        let url = DatabaseUrl("postgres://svc:s3cret@db/ap".into());
        assert_eq!(format!("{url:?}"), "postgres://svc:***@db/ap");
    }

    #[test]
    fn a_list_file_takes_commas_and_lines_and_trims() {
        let path = std::env::temp_dir().join(format!("ap-secrets-{}", uuid::Uuid::new_v4()));
        std::fs::write(&path, " first , second\n\nthird\r\n").unwrap();
        let read: Vec<String> = read_list(&path)
            .unwrap()
            .iter()
            .map(|s| s.expose().to_owned())
            .collect();
        assert_eq!(read, ["first", "second", "third"]);
        std::fs::write(&path, " \n,\n").unwrap();
        assert!(
            read_list(&path)
                .unwrap_err()
                .to_string()
                .contains("holds no secret")
        );
        std::fs::remove_file(&path).unwrap();
        let missing = read_list(Path::new("/nonexistent/secrets")).unwrap_err();
        assert!(
            missing
                .to_string()
                .starts_with("could not read /nonexistent/secrets")
        );
    }
}
