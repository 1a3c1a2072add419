//! The static files of `gateway.web_dir` (the API reference, and the
//! storefront and dashboard to come), answered by the gateway itself: no
//! Lua, no upstream hop.
//!
//! ```text
//! start-up: web_dir ──read every file──▶ WebFiles (in memory: bytes,
//!           gzip of the compressible ones, content type, ETag)
//! request on a `files` route: path ──▶ file (a folder: its index.html)
//!           If-None-Match = ETag ──▶ 304; Accept-Encoding gzip ──▶ the gzip
//!           copy; else the bytes; none ──▶ 404
//! ```
//!
//! Files are read once: they are part of a release, like the binary, and a
//! few hundred KB. HTML is `no-cache` (always revalidated, so a release
//! shows at once); other files may be kept 5 minutes, then revalidated by
//! ETag, which costs a 304.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::problem::LocalResponse;

/// How long a browser may reuse a non-HTML file without asking.
const ASSET_CACHE_CONTROL: &str = "public, max-age=300";
/// HTML is revalidated on every load.
const PAGE_CACHE_CONTROL: &str = "no-cache";
/// Files smaller than this are not worth compressing.
const MIN_GZIP_BYTES: usize = 1024;

/// Why the files could not be read.
#[derive(Debug, thiserror::Error)]
#[error("web files in {dir}: {source}")]
pub struct WebFilesError {
    dir: String,
    source: std::io::Error,
}

/// One file, ready to send.
#[derive(Debug)]
struct Asset {
    body: Bytes,
    gzip: Option<Bytes>,
    content_type: &'static str,
    etag: String,
    cache_control: &'static str,
}

/// Every file of the web folder, by its path relative to it (`/`-separated).
#[derive(Debug, Default)]
pub struct WebFiles {
    files: HashMap<String, Asset>,
}

impl WebFiles {
    /// Reads every file under `dir` (dot-files skipped). A missing folder is
    /// an empty site: `files` routes answer 404 and the rest works.
    pub fn load(dir: &Path) -> Result<WebFiles, WebFilesError> {
        let err = |source| WebFilesError {
            dir: dir.display().to_string(),
            source,
        };
        let mut files = HashMap::new();
        if !dir.exists() {
            tracing::warn!(dir = %dir.display(), "web folder missing; file routes answer 404");
            return Ok(WebFiles { files });
        }
        for path in walk(dir).map_err(err)? {
            let body = std::fs::read(&path).map_err(err)?;
            let rel = path
                .strip_prefix(dir)
                .unwrap_or(&path)
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/");
            files.insert(rel.clone(), Asset::new(&rel, body));
        }
        tracing::info!(dir = %dir.display(), files = files.len(), "web files loaded");
        Ok(WebFiles { files })
    }

    /// Number of files held.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// True when no file is held.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// The answer for `path` (the request's, without query), given the
    /// request's `If-None-Match` and `Accept-Encoding`.
    pub fn answer(
        &self,
        path: &str,
        if_none_match: Option<&str>,
        accept_encoding: Option<&str>,
    ) -> LocalResponse {
        let Some(asset) = self.find(path) else {
            return LocalResponse::problem(404, "no such file");
        };
        let common = |r: LocalResponse| {
            r.with_header("etag", asset.etag.clone())
                .with_header("cache-control", asset.cache_control)
                .with_header("vary", "accept-encoding")
        };
        if if_none_match.is_some_and(|tags| etag_matches(tags, &asset.etag)) {
            return common(LocalResponse {
                status: 304,
                headers: Vec::new(),
                body: Bytes::new(),
            });
        }
        let (body, gzip) = match (&asset.gzip, accept_encoding) {
            (Some(gz), Some(accept)) if accepts_gzip(accept) => (gz.clone(), true),
            _ => (asset.body.clone(), false),
        };
        let mut response = common(LocalResponse {
            status: 200,
            headers: vec![("content-type".into(), asset.content_type.into())],
            body,
        });
        if gzip {
            response = response.with_header("content-encoding", "gzip");
        }
        response
    }

    fn find(&self, path: &str) -> Option<&Asset> {
        let rel = path.trim_start_matches('/');
        if rel
            .split('/')
            .any(|seg| seg == ".." || seg.starts_with('.'))
        {
            return None;
        }
        let index = |dir: &str| {
            if dir.is_empty() {
                "index.html".to_string()
            } else {
                format!("{}/index.html", dir.trim_end_matches('/'))
            }
        };
        if rel.is_empty() || rel.ends_with('/') {
            return self.files.get(&index(rel));
        }
        self.files.get(rel).or_else(|| self.files.get(&index(rel)))
    }
}

impl Asset {
    fn new(rel: &str, body: Vec<u8>) -> Asset {
        let content_type = content_type(rel);
        let etag = format!("\"{}\"", hex::encode(&Sha256::digest(&body)[..12]));
        let gzip = (compressible(content_type) && body.len() >= MIN_GZIP_BYTES)
            .then(|| gzip(&body))
            .flatten()
            .filter(|gz| gz.len() < body.len())
            .map(Bytes::from);
        let cache_control = if content_type.starts_with("text/html") {
            PAGE_CACHE_CONTROL
        } else {
            ASSET_CACHE_CONTROL
        };
        Asset {
            body: Bytes::from(body),
            gzip,
            content_type,
            etag,
            cache_control,
        }
    }
}

fn walk(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d)? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let kind = entry.file_type()?;
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() {
                out.push(entry.path());
            }
        }
    }
    Ok(out)
}

fn gzip(body: &[u8]) -> Option<Vec<u8>> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(body).ok()?;
    encoder.finish().ok()
}

fn content_type(rel: &str) -> &'static str {
    let ext = rel.rsplit_once('.').map(|(_, e)| e).unwrap_or("");
    match ext.to_ascii_lowercase().as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "woff2" => "font/woff2",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

fn compressible(content_type: &str) -> bool {
    content_type.starts_with("text/")
        || content_type == "application/json"
        || content_type == "image/svg+xml"
}

/// `gzip` is listed and not refused with `q=0`.
fn accepts_gzip(accept: &str) -> bool {
    accept.split(',').any(|part| {
        let mut bits = part.split(';').map(str::trim);
        let coding = bits.next().unwrap_or("");
        let refused = bits.any(|p| p.replace(' ', "") == "q=0");
        (coding.eq_ignore_ascii_case("gzip") || coding == "*") && !refused
    })
}

/// `If-None-Match` lists `etag` (weak or strong) or is `*`.
fn etag_matches(tags: &str, etag: &str) -> bool {
    tags.split(',')
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == etag || t == "*")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site() -> (tempfile::TempDir, WebFiles) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("api/docs")).unwrap();
        std::fs::write(dir.path().join("index.html"), "<h1>shop</h1>").unwrap();
        std::fs::write(dir.path().join("api/docs/index.html"), "<redoc>").unwrap();
        std::fs::write(
            dir.path().join("api/docs/app.js"),
            "let x = 1;\n".repeat(500),
        )
        .unwrap();
        std::fs::write(dir.path().join(".secret"), "no").unwrap();
        let files = WebFiles::load(dir.path()).unwrap();
        (dir, files)
    }

    fn header<'a>(r: &'a LocalResponse, name: &str) -> Option<&'a str> {
        r.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn paths_name_files_and_folders_their_index() {
        let (_dir, files) = site();
        assert_eq!(files.len(), 3, "dot-files are not served");
        assert_eq!(files.answer("/", None, None).body, "<h1>shop</h1>");
        assert_eq!(files.answer("/api/docs", None, None).body, "<redoc>");
        assert_eq!(files.answer("/api/docs/", None, None).body, "<redoc>");
        let page = files.answer("/api/docs", None, None);
        assert_eq!(header(&page, "cache-control"), Some(PAGE_CACHE_CONTROL));
        assert_eq!(
            header(&page, "content-type"),
            Some("text/html; charset=utf-8")
        );
        for missing in [
            "/nope",
            "/.secret",
            "/api/../index.html",
            "/api/docs/app.js/x",
        ] {
            assert_eq!(files.answer(missing, None, None).status, 404, "{missing}");
        }
    }

    #[test]
    fn gzip_when_accepted_and_304_when_unchanged() {
        let (_dir, files) = site();
        let plain = files.answer("/api/docs/app.js", None, Some("br"));
        assert_eq!(header(&plain, "content-encoding"), None);
        assert_eq!(plain.body.len(), 5500);
        let gz = files.answer("/api/docs/app.js", None, Some("gzip, deflate, br"));
        assert_eq!(header(&gz, "content-encoding"), Some("gzip"));
        assert!(gz.body.len() < 200, "{}", gz.body.len());
        let refused = files.answer("/api/docs/app.js", None, Some("gzip;q=0"));
        assert_eq!(header(&refused, "content-encoding"), None);
        let etag = header(&plain, "etag").unwrap().to_string();
        let again = files.answer("/api/docs/app.js", Some(&format!("W/{etag}")), None);
        assert_eq!(again.status, 304);
        assert!(again.body.is_empty());
        assert_eq!(
            files
                .answer("/api/docs/app.js", Some("\"other\""), None)
                .status,
            200
        );
    }

    #[test]
    fn a_missing_folder_is_an_empty_site() {
        let files = WebFiles::load(Path::new("/nonexistent/web")).unwrap();
        assert!(files.is_empty());
        assert_eq!(files.answer("/", None, None).status, 404);
    }
}
