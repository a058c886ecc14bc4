//! Read-only commands while `adapterlab serve` holds the store: sled lets one process open it,
//! so `report` and `runs list`, `show` and `compare` ask the running server instead, through
//! its API.
//!
//! The server says where it listens in `<data>/server.json` (written once it listens, removed
//! when it stops); the token is `ADAPTERLAB_TOKEN` or the data directory's `token` file, the
//! same two places `serve` takes it from.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::paths::DataDir;
use crate::store::{Store, StoreError};

/// What a running server writes to `<data>/server.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerFile {
    /// The base URL a local client reaches it at (loopback when it listens on every address).
    pub url: String,
    pub pid: u32,
}

/// The file a server announces itself in.
pub fn server_file(data_dir: &DataDir) -> std::path::PathBuf {
    data_dir.root().join("server.json")
}

/// Writes `<data>/server.json` for a server listening on `addr`.
pub fn announce(data_dir: &DataDir, addr: std::net::SocketAddr) -> Result<()> {
    let mut local = addr;
    if addr.ip().is_unspecified() {
        local.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let file = ServerFile {
        url: format!("http://{local}"),
        pid: std::process::id(),
    };
    let path = server_file(data_dir);
    std::fs::write(&path, serde_json::to_vec_pretty(&file)?)
        .with_context(|| format!("failed to write {}", path.display()))
}

/// Removes `<data>/server.json` if this process wrote it (a re-executed server rewrites it).
pub fn withdraw(data_dir: &DataDir) {
    let path = server_file(data_dir);
    let ours = std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice::<ServerFile>(&b).ok())
        .is_some_and(|f| f.pid == std::process::id());
    if ours {
        let _ = std::fs::remove_file(&path);
    }
}

/// Where a read-only command reads runs from.
pub enum Source {
    Store(Store),
    Server(Server),
}

/// The store, or, when a server holds it, that server.
pub fn source(ctx: &crate::cli::Context) -> Result<Source> {
    match ctx.store() {
        Ok(store) => Ok(Source::Store(store)),
        Err(e)
            if matches!(
                e.downcast_ref::<StoreError>(),
                Some(StoreError::Locked { .. })
            ) =>
        {
            let server = Server::discover(&ctx.data_dir).with_context(|| format!("{e:#}"))?;
            Ok(Source::Server(server))
        }
        Err(e) => Err(e),
    }
}

/// A running server of this data directory, as a client of its API.
pub struct Server {
    pub url: String,
    token: String,
    client: reqwest::blocking::Client,
}

impl Server {
    /// The server `<data>/server.json` names, with the token to call it.
    pub fn discover(data_dir: &DataDir) -> Result<Server> {
        let path = server_file(data_dir);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            anyhow!(
                "no server announced itself in {} ({e}); stop the other process, or start `adapterlab serve` so that commands can read through it",
                path.display()
            )
        })?;
        let file: ServerFile = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a server announcement", path.display()))?;
        let token = token(data_dir.root())?;
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(300))
            .build()
            .context("failed to build the HTTP client")?;
        Ok(Server {
            url: file.url.trim_end_matches('/').to_string(),
            token,
            client,
        })
    }

    /// GETs `segments` (each percent-encoded) with `query`; a refusal carries the server's
    /// own message.
    pub fn get(
        &self,
        segments: &[&str],
        query: &[(&str, &str)],
    ) -> Result<reqwest::blocking::Response> {
        let mut url = reqwest::Url::parse(&self.url)
            .with_context(|| format!("the server's address {} is not a URL", self.url))?;
        url.path_segments_mut()
            .map_err(|()| anyhow!("the server's address {} cannot take a path", self.url))?
            .extend(segments);
        let shown = url.path().to_string();
        let response = self
            .client
            .get(url)
            .query(query)
            .bearer_auth(&self.token)
            .send()
            .with_context(|| format!("the server at {} did not answer GET {shown}", self.url))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.text().unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(String::from))
            .unwrap_or(body);
        if status == reqwest::StatusCode::UNAUTHORIZED {
            bail!(
                "the server at {} refused the token (set ADAPTERLAB_TOKEN to the token it was started with): {message}",
                self.url
            );
        }
        bail!("{message}")
    }

    /// GETs JSON.
    pub fn json<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        query: &[(&str, &str)],
    ) -> Result<T> {
        let response = self.get(segments, query)?;
        response.json().with_context(|| {
            format!(
                "the server at {} sent an answer that does not read as expected",
                self.url
            )
        })
    }
}

/// The token as `serve` resolves it, without generating one.
fn token(root: &Path) -> Result<String> {
    if let Ok(t) = std::env::var("ADAPTERLAB_TOKEN")
        && !t.trim().is_empty()
    {
        return Ok(t.trim().to_string());
    }
    let path = root.join("token");
    let t = std::fs::read_to_string(&path).map_err(|e| {
        anyhow!(
            "the server needs its token: set ADAPTERLAB_TOKEN (no token file at {}: {e})",
            path.display()
        )
    })?;
    Ok(t.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_announcement_names_loopback_for_a_wildcard_address_and_is_withdrawn_by_its_writer() {
        let dir = std::env::temp_dir().join(format!("adapterlab-remote-{}", std::process::id()));
        let data = DataDir::resolve(Some(&dir)).unwrap();
        announce(&data, "0.0.0.0:7860".parse().unwrap()).unwrap();
        let file: ServerFile =
            serde_json::from_slice(&std::fs::read(server_file(&data)).unwrap()).unwrap();
        assert_eq!(file.url, "http://127.0.0.1:7860");
        assert_eq!(file.pid, std::process::id());
        // Another process's announcement stays.
        let other = ServerFile {
            url: file.url.clone(),
            pid: file.pid + 1,
        };
        std::fs::write(server_file(&data), serde_json::to_vec(&other).unwrap()).unwrap();
        withdraw(&data);
        assert!(server_file(&data).exists());
        announce(&data, "[::]:80".parse().unwrap()).unwrap();
        withdraw(&data);
        assert!(!server_file(&data).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
