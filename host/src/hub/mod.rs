//! Publishing to the Hugging Face Hub: an adapter (or a merged model) and its model card,
//! through the Hub's commit API as `huggingface_hub` uses it: create the repository, ask
//! `preupload` which files go through LFS, upload those with the LFS batch API, then one
//! NDJSON commit. The token comes from `HF_TOKEN` or the Hugging Face token file.
//!
//! **Architecture Invariant:** only this module speaks the Hub's write API.

pub mod card;

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use base64::Engine as _;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Where the Hub is and who we are there.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// `HF_ENDPOINT`, default `https://huggingface.co`.
    pub endpoint: String,
    pub token: String,
}

impl HubConfig {
    /// The endpoint and token as `huggingface_hub` finds them: `HF_TOKEN` (or the older
    /// `HUGGING_FACE_HUB_TOKEN`), else `$HF_TOKEN_PATH`, `$HF_HOME/token`, or
    /// `~/.cache/huggingface/token`.
    pub fn from_env() -> Result<Self> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let endpoint = var("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".into());
        let token = match var("HF_TOKEN").or_else(|| var("HUGGING_FACE_HUB_TOKEN")) {
            Some(t) => t,
            None => {
                let path = var("HF_TOKEN_PATH").map(PathBuf::from).unwrap_or_else(|| {
                    var("HF_HOME")
                        .map(PathBuf::from)
                        .or_else(|| {
                            directories::BaseDirs::new()
                                .map(|b| b.home_dir().join(".cache/huggingface"))
                        })
                        .unwrap_or_default()
                        .join("token")
                });
                std::fs::read_to_string(&path)
                    .ok()
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty())
                    .with_context(|| {
                        format!(
                            "no Hugging Face token: set HF_TOKEN or log in with `hf auth login` (looked in {})",
                            path.display()
                        )
                    })?
            }
        };
        crate::redact::register_secret(&token);
        Ok(HubConfig {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token,
        })
    }
}

/// A file to publish: its path in the repository and its bytes.
pub type RepoFile = (String, Vec<u8>);

/// What to push.
#[derive(Debug, Clone)]
pub struct PushRequest {
    /// `owner/name`.
    pub repo: String,
    pub private: bool,
    /// The branch to commit to (created when missing); `main` when none.
    pub revision: Option<String>,
    pub message: String,
    /// Path in the repository → contents.
    pub files: Vec<RepoFile>,
}

/// How a file went up.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Pushed {
    pub path: String,
    pub size: usize,
    pub lfs: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PushOutcome {
    pub repo: String,
    pub revision: String,
    pub commit_url: Option<String>,
    pub files: Vec<Pushed>,
}

/// `owner/name`, each part as the Hub allows.
pub fn check_repo_id(repo: &str) -> Result<(&str, &str)> {
    let valid = |s: &str| {
        !s.is_empty()
            && s.len() <= 96
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && !s.starts_with(['-', '.'])
            && !s.ends_with('.')
            && !s.contains("..")
    };
    match repo.split_once('/') {
        Some((owner, name)) if valid(owner) && valid(name) => Ok((owner, name)),
        _ => bail!("--repo {repo:?}: expected OWNER/NAME (letters, digits, '-', '_', '.')"),
    }
}

/// The files of a folder to publish: an adapter (`adapter_config.json`, its safetensors) or a
/// merged model (every file of the folder: config, weights, tokenizer). Subfolders (training
/// checkpoints) are left out.
pub fn folder_files(dir: &Path) -> Result<(bool, Vec<RepoFile>)> {
    let is_adapter = dir.join("adapter_config.json").is_file();
    if !is_adapter && !dir.join("config.json").is_file() {
        bail!(
            "{} holds neither a PEFT adapter (adapter_config.json) nor a model (config.json)",
            dir.display()
        );
    }
    let mut files = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("failed to read {}", dir.display()))?
        .flatten()
        .filter(|e| e.path().is_file())
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        let keep = if is_adapter {
            matches!(
                name.as_str(),
                "adapter_config.json" | "adapter_model.safetensors" | "adapter_model.bin"
            )
        } else {
            !name.starts_with('.') && name != "README.md"
        };
        if keep {
            let bytes = std::fs::read(entry.path())
                .with_context(|| format!("failed to read {}", entry.path().display()))?;
            files.push((name, bytes));
        }
    }
    Ok((is_adapter, files))
}

/// The Hub's client.
pub struct Hub {
    http: reqwest::blocking::Client,
    config: HubConfig,
}

impl Hub {
    pub fn new(config: HubConfig) -> Result<Self> {
        let http = reqwest::blocking::Client::builder()
            .timeout(std::time::Duration::from_secs(600))
            .user_agent(concat!("adapterlab/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Hub { http, config })
    }

    /// Creates the repository if needed, uploads the files (LFS where the Hub says so) and
    /// commits them in one commit.
    pub fn push(&self, request: &PushRequest) -> Result<PushOutcome> {
        let (owner, name) = check_repo_id(&request.repo)?;
        let revision = request.revision.clone().unwrap_or_else(|| "main".into());
        self.create_repo(owner, name, request.private)?;
        if revision != "main" {
            self.create_branch(&request.repo, &revision)?;
        }
        let rev = encode_segment(&revision);
        let modes = self.preupload(&request.repo, &rev, &request.files)?;
        let mut pushed = Vec::new();
        let mut lines = vec![
            json!({"key": "header", "value": {"summary": request.message, "description": ""}}),
        ];
        for (path, bytes) in &request.files {
            let lfs = modes.iter().any(|(p, mode)| p == path && mode == "lfs");
            if lfs {
                let oid = hex::encode(Sha256::digest(bytes));
                self.upload_lfs(&request.repo, &revision, &oid, bytes)?;
                lines.push(json!({"key": "lfsFile", "value": {"path": path, "algo": "sha256", "oid": oid, "size": bytes.len()}}));
            } else {
                lines.push(json!({"key": "file", "value": {
                    "content": base64::engine::general_purpose::STANDARD.encode(bytes),
                    "path": path, "encoding": "base64"}}));
            }
            pushed.push(Pushed {
                path: path.clone(),
                size: bytes.len(),
                lfs,
            });
        }
        let body: String = lines.iter().map(|l| format!("{l}\n")).collect();
        let answer = self.send(
            self.http
                .post(format!(
                    "{}/api/models/{}/commit/{rev}",
                    self.config.endpoint, request.repo
                ))
                .header("Content-Type", "application/x-ndjson")
                .body(body),
            "commit",
        )?;
        Ok(PushOutcome {
            repo: request.repo.clone(),
            revision,
            commit_url: answer["commitUrl"].as_str().map(str::to_string),
            files: pushed,
        })
    }

    fn create_repo(&self, owner: &str, name: &str, private: bool) -> Result<()> {
        let response = self
            .auth(
                self.http
                    .post(format!("{}/api/repos/create", self.config.endpoint)),
            )
            .json(
                &json!({"name": name, "organization": owner, "private": private, "type": "model"}),
            )
            .send()
            .with_context(|| format!("the Hub at {} cannot be reached", self.config.endpoint))?;
        // 409: it exists already, which is what a second push expects.
        if response.status().is_success() || response.status().as_u16() == 409 {
            return Ok(());
        }
        Err(self.refusal(response, "repos/create"))
    }

    fn create_branch(&self, repo: &str, branch: &str) -> Result<()> {
        let response = self
            .auth(self.http.post(format!(
                "{}/api/models/{repo}/branch/{}",
                self.config.endpoint,
                encode_segment(branch)
            )))
            .json(&json!({}))
            .send()?;
        if response.status().is_success() || response.status().as_u16() == 409 {
            return Ok(());
        }
        Err(self.refusal(response, "branch"))
    }

    /// Which files the Hub wants through LFS (`uploadMode: lfs`).
    fn preupload(
        &self,
        repo: &str,
        rev: &str,
        files: &[(String, Vec<u8>)],
    ) -> Result<Vec<(String, String)>> {
        let listed: Vec<Value> = files
            .iter()
            .map(|(path, bytes)| {
                json!({"path": path, "size": bytes.len(),
                       "sample": base64::engine::general_purpose::STANDARD.encode(&bytes[..bytes.len().min(512)])})
            })
            .collect();
        let answer = self.send(
            self.http
                .post(format!(
                    "{}/api/models/{repo}/preupload/{rev}",
                    self.config.endpoint
                ))
                .json(&json!({"files": listed})),
            "preupload",
        )?;
        Ok(answer["files"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| {
                Some((
                    f["path"].as_str()?.to_string(),
                    f["uploadMode"].as_str()?.to_string(),
                ))
            })
            .collect())
    }

    /// The LFS batch API, then the upload (and verify) actions it gives; none when the Hub
    /// already has the object.
    fn upload_lfs(&self, repo: &str, revision: &str, oid: &str, bytes: &[u8]) -> Result<()> {
        let answer = self.send(
            self.http
                .post(format!("{}/{repo}.git/info/lfs/objects/batch", self.config.endpoint))
                .header("Accept", "application/vnd.git-lfs+json")
                .header("Content-Type", "application/vnd.git-lfs+json")
                .body(
                    json!({"operation": "upload", "transfers": ["basic"], "hash_algo": "sha256",
                           "ref": {"name": revision}, "objects": [{"oid": oid, "size": bytes.len()}]})
                    .to_string(),
                ),
            "lfs batch",
        )?;
        let object = &answer["objects"][0];
        if let Some(error) = object.get("error") {
            bail!("the Hub's LFS refused {oid}: {error}");
        }
        let actions = &object["actions"];
        if let Some(upload) = actions.get("upload") {
            let href = upload["href"]
                .as_str()
                .context("LFS upload action without href")?;
            let mut put = self.http.put(href).body(bytes.to_vec());
            for (k, v) in upload["header"].as_object().into_iter().flatten() {
                put = put.header(k.as_str(), v.as_str().unwrap_or_default());
            }
            let response = put.send().context("the LFS upload failed")?;
            if !response.status().is_success() {
                return Err(self.refusal(response, "lfs upload"));
            }
        }
        if let Some(verify) = actions.get("verify") {
            let href = verify["href"]
                .as_str()
                .context("LFS verify action without href")?;
            let mut post = self
                .auth(self.http.post(href))
                .json(&json!({"oid": oid, "size": bytes.len()}));
            for (k, v) in verify["header"].as_object().into_iter().flatten() {
                post = post.header(k.as_str(), v.as_str().unwrap_or_default());
            }
            let response = post.send()?;
            if !response.status().is_success() {
                return Err(self.refusal(response, "lfs verify"));
            }
        }
        Ok(())
    }

    fn auth(
        &self,
        request: reqwest::blocking::RequestBuilder,
    ) -> reqwest::blocking::RequestBuilder {
        request.bearer_auth(&self.config.token)
    }

    fn send(&self, request: reqwest::blocking::RequestBuilder, what: &str) -> Result<Value> {
        let response = self.auth(request).send().with_context(|| {
            format!(
                "the Hub at {} cannot be reached ({what})",
                self.config.endpoint
            )
        })?;
        if !response.status().is_success() {
            return Err(self.refusal(response, what));
        }
        let text = response.text().unwrap_or_default();
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    fn refusal(&self, response: reqwest::blocking::Response, what: &str) -> anyhow::Error {
        let status = response.status();
        let text = response.text().unwrap_or_default();
        let hint = match status.as_u16() {
            401 => " (is HF_TOKEN valid?)",
            403 => " (does the token have write access to this repository?)",
            _ => "",
        };
        anyhow::anyhow!(
            "the Hub refused {what}: {status}{hint}: {}",
            crate::redact::redact(&crate::plugin::limits::truncate(&text, 500))
        )
    }
}

/// A branch name as one URL path segment (`/` in branch names included).
fn encode_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_and_branch_segments() {
        assert!(check_repo_id("me/my-adapter.v2").is_ok());
        for bad in ["noslash", "a/b/c", "me/", "/x", "me/../x", "me/a b"] {
            assert!(check_repo_id(bad).is_err(), "{bad}");
        }
        assert_eq!(encode_segment("feature/x"), "feature%2Fx");
    }
}
