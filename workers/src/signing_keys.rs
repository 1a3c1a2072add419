//! Development key material: the RS256 pair the api signs tokens with and the
//! admin bearer token. Generated on first run into the git-ignored `var/keys`
//! so no secret is ever committed; production deployments bring their own.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rand::RngCore;
use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
use rsa::RsaPrivateKey;

/// Why key material could not be written.
#[derive(Debug, thiserror::Error)]
pub enum KeyGenError {
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("generating RSA key: {0}")]
    Rsa(String),
    #[error("kid `{0}` may only use letters, digits, '-', '_', '.'")]
    BadKid(String),
    #[error("{0} already exists; a key is never overwritten by a rotation")]
    Exists(PathBuf),
}

/// Paths written (or found already present).
#[derive(Debug, Clone)]
pub struct GeneratedKeys {
    pub private_key: PathBuf,
    pub public_key: PathBuf,
    pub admin_token: PathBuf,
    /// The api's secret on the wallet's internal routes.
    pub service_token: PathBuf,
    /// False when everything already existed and nothing was written.
    pub created: bool,
}

/// Creates `<dir>/<kid>.private.pem`, `<dir>/<kid>.public.pem` (2048-bit
/// RSA, PKCS#8 / SPKI), `<dir>/admin-token` and `<dir>/service-token`
/// unless they exist; `force` replaces them.
pub fn generate(dir: &Path, kid: &str, force: bool) -> Result<GeneratedKeys, KeyGenError> {
    check_kid(kid)?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| KeyGenError::Io { path, source }
    };
    fs::create_dir_all(dir).map_err(io(dir))?;
    let private_key = dir.join(format!("{kid}.private.pem"));
    let public_key = dir.join(format!("{kid}.public.pem"));
    let admin_token = dir.join("admin-token");
    let mut created = false;

    if force || !private_key.exists() || !public_key.exists() {
        write_pair(&private_key, &public_key)?;
        created = true;
    }
    let service_token = dir.join("service-token");
    for token in [&admin_token, &service_token] {
        if force || !token.exists() {
            write_random_token(token).map_err(io(token))?;
            created = true;
        }
    }
    Ok(GeneratedKeys {
        private_key,
        public_key,
        admin_token,
        service_token,
        created,
    })
}

/// 256 random bits, hex, owner-only.
fn write_random_token(path: &Path) -> std::io::Result<()> {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    write_secret(path, format!("{token}\n").as_bytes())
}

/// Creates a new pair `<dir>/<kid>.private.pem` and `<dir>/<kid>.public.pem`
/// for a key rotation; an existing pair of that kid is never overwritten.
pub fn generate_pair(dir: &Path, kid: &str) -> Result<(PathBuf, PathBuf), KeyGenError> {
    check_kid(kid)?;
    let private_key = dir.join(format!("{kid}.private.pem"));
    let public_key = dir.join(format!("{kid}.public.pem"));
    if private_key.exists() || public_key.exists() {
        return Err(KeyGenError::Exists(private_key));
    }
    fs::create_dir_all(dir).map_err(|source| KeyGenError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    write_pair(&private_key, &public_key)?;
    Ok((private_key, public_key))
}

/// A fresh 2048-bit RSA pair, PKCS#8 private (owner-only) and SPKI public.
fn write_pair(private_key: &Path, public_key: &Path) -> Result<(), KeyGenError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| KeyGenError::Io { path, source }
    };
    let mut rng = rsa::rand_core::OsRng;
    let key = RsaPrivateKey::new(&mut rng, 2048).map_err(|e| KeyGenError::Rsa(e.to_string()))?;
    let private_pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| KeyGenError::Rsa(e.to_string()))?;
    let public_pem = key
        .to_public_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| KeyGenError::Rsa(e.to_string()))?;
    write_secret(private_key, private_pem.as_bytes()).map_err(io(private_key))?;
    fs::write(public_key, public_pem.as_bytes()).map_err(io(public_key))
}

fn check_kid(kid: &str) -> Result<(), KeyGenError> {
    if kid.is_empty()
        || !kid
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(KeyGenError::BadKid(kid.to_string()));
    }
    Ok(())
}

/// Writes a file readable by its owner only.
fn write_secret(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_then_keeps() {
        let dir = tempfile::tempdir().unwrap();
        let first = generate(dir.path(), "k1", false).unwrap();
        assert!(first.created);
        let pem = fs::read_to_string(&first.public_key).unwrap();
        assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----"));
        let again = generate(dir.path(), "k1", false).unwrap();
        assert!(!again.created);
        assert_eq!(fs::read_to_string(&again.public_key).unwrap(), pem);
        assert!(generate(dir.path(), "../etc", false).is_err());
    }
}
