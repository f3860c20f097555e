//! `koogate replay`: send fixture payloads to a gateway exactly as KooGallery
//! would (signed with the given access key, fresh timestamp and nonce), check
//! every answer's `Body-Sign` and result code, and report.
//!
//! A fixture is a V2 body (sent byte for byte) or, under a `v1` folder or
//! with `--v1`, a JSON object of V1 query parameters. The expected result
//! code is `--expect`, else what an `expect.toml` beside the fixture says for
//! its file name, else `000000`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::protocol::sign::verify_body_sign;
use crate::protocol::Generation;
use crate::tools::client::{CallResponse, KooClient};

/// One payload to send.
#[derive(Clone, Debug)]
pub struct Fixture {
    pub name: String,
    pub generation: Generation,
    pub bytes: Vec<u8>,
    pub expect: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: a V1 fixture must be a JSON object of string parameters ({message})")]
    V1Shape { path: String, message: String },
    #[error("{path}: expect.toml is not valid: {message}")]
    Expectations { path: String, message: String },
    #[error("no fixtures found in {0}")]
    Empty(String),
}

/// Loads fixtures from files and directories (sorted by name, `.json` only).
pub fn load(paths: &[PathBuf], force_v1: bool, expect: Option<&str>) -> Result<Vec<Fixture>, ReplayError> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|source| ReplayError::Read { path: path.display().to_string(), source })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "json"))
                .collect();
            entries.sort();
            if entries.is_empty() {
                return Err(ReplayError::Empty(path.display().to_string()));
            }
            files.extend(entries);
        } else {
            files.push(path.clone());
        }
    }
    let mut expectations: BTreeMap<PathBuf, BTreeMap<String, String>> = BTreeMap::new();
    files
        .into_iter()
        .map(|file| {
            let bytes = std::fs::read(&file)
                .map_err(|source| ReplayError::Read { path: file.display().to_string(), source })?;
            let dir = file.parent().unwrap_or(Path::new(".")).to_path_buf();
            let is_v1 = force_v1 || file.components().any(|c| c.as_os_str() == "v1");
            let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let expect = match expect {
                Some(code) => code.to_owned(),
                None => {
                    if !expectations.contains_key(&dir) {
                        expectations.insert(dir.clone(), read_expectations(&dir)?);
                    }
                    expectations[&dir].get(&name).cloned().unwrap_or_else(|| "000000".into())
                }
            };
            let fixture = Fixture {
                name: file.display().to_string(),
                generation: if is_v1 { Generation::V1 } else { Generation::V2 },
                bytes,
                expect,
            };
            if is_v1 {
                v1_params(&fixture)?;
            }
            Ok(fixture)
        })
        .collect()
}

fn read_expectations(dir: &Path) -> Result<BTreeMap<String, String>, ReplayError> {
    let path = dir.join("expect.toml");
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text).map_err(|e| ReplayError::Expectations {
            path: path.display().to_string(),
            message: e.message().to_owned(),
        }),
        Err(_) => Ok(BTreeMap::new()),
    }
}

fn v1_params(f: &Fixture) -> Result<BTreeMap<String, String>, ReplayError> {
    serde_json::from_slice(&f.bytes).map_err(|e| ReplayError::V1Shape { path: f.name.clone(), message: e.to_string() })
}

/// One answer, as the table shows it.
#[derive(Clone, Debug)]
pub struct Row {
    pub fixture: String,
    pub activity: String,
    pub order: String,
    pub http_status: Option<u16>,
    pub code: String,
    pub expect: String,
    pub instance_id: String,
    pub signature_ok: bool,
    pub latency: Duration,
    pub error: Option<String>,
}

impl Row {
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.signature_ok && self.code == self.expect
    }
}

/// Where and how to send.
#[derive(Clone, Debug)]
pub struct Target {
    pub url: String,
    pub v2_path: String,
    pub v1_path: String,
    pub access_key: String,
}

fn field(json: &serde_json::Value, names: &[&str]) -> String {
    names.iter().find_map(|n| json.get(*n).and_then(|v| v.as_str())).unwrap_or("").to_owned()
}

async fn send_one(client: &KooClient, target: &Target, f: &Fixture) -> Row {
    let (activity, order) = match f.generation {
        Generation::V2 => {
            let json: serde_json::Value = serde_json::from_slice(&f.bytes).unwrap_or_default();
            (field(&json, &["activity"]), field(&json, &["orderId"]))
        }
        Generation::V1 => {
            let params = v1_params(f).unwrap_or_default();
            (params.get("activity").cloned().unwrap_or_default(), params.get("orderId").cloned().unwrap_or_default())
        }
    };
    let started = Instant::now();
    let now = chrono::Utc::now().timestamp_millis();
    let sent = match f.generation {
        Generation::V2 => client.v2(&target.v2_path, &target.access_key, &f.bytes, now).await,
        Generation::V1 => client.v1(&target.v1_path, &target.access_key, &v1_params(f).unwrap_or_default(), now).await,
    };
    let latency = started.elapsed();
    let mut row = Row {
        fixture: f.name.clone(),
        activity,
        order,
        http_status: None,
        code: String::new(),
        expect: f.expect.clone(),
        instance_id: String::new(),
        signature_ok: false,
        latency,
        error: None,
    };
    match sent {
        Ok(res) => fill(&mut row, &res, &target.access_key),
        Err(e) => row.error = Some(e.to_string()),
    }
    row
}

fn fill(row: &mut Row, res: &CallResponse, access_key: &str) {
    row.http_status = Some(res.status);
    let json = res.json().unwrap_or_default();
    row.code = field(&json, &["resultCode"]);
    row.instance_id = field(&json, &["instanceId"]);
    row.signature_ok = res.body_sign.as_deref().is_some_and(|h| verify_body_sign(access_key, &res.body, h));
    if row.code.is_empty() {
        row.error = Some(format!(
            "answer has no resultCode: {}",
            String::from_utf8_lossy(&res.body).chars().take(120).collect::<String>()
        ));
    } else if row.code != row.expect {
        row.error = Some(field(&json, &["resultMsg"]));
    }
}

/// Sends every fixture `repeat` times (`concurrency` at once), fixture after fixture.
pub async fn run(
    client: &KooClient,
    target: &Target,
    fixtures: &[Fixture],
    repeat: usize,
    concurrency: usize,
) -> Vec<Row> {
    run_with_progress(client, target, fixtures, repeat, concurrency, |_, _| {}).await
}

/// [`run`], calling `progress(done, total)` after every answer (a live progress line).
pub async fn run_with_progress(
    client: &KooClient,
    target: &Target,
    fixtures: &[Fixture],
    repeat: usize,
    concurrency: usize,
    progress: impl Fn(usize, usize),
) -> Vec<Row> {
    let total = fixtures.len() * repeat.max(1);
    let target = Arc::new(target.clone());
    let mut rows = Vec::new();
    for f in fixtures {
        let f = Arc::new(f.clone());
        let mut remaining = repeat.max(1);
        while remaining > 0 {
            let wave = remaining.min(concurrency.max(1));
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..wave {
                let (client, target, f) = (client.clone(), Arc::clone(&target), Arc::clone(&f));
                tasks.spawn(async move { send_one(&client, &target, &f).await });
            }
            while let Some(done) = tasks.join_next().await {
                if let Ok(row) = done {
                    rows.push(row);
                }
                progress(rows.len(), total);
            }
            remaining -= wave;
        }
    }
    rows
}

/// The fixture as shown: its folder and file name (`v2/01-newInstance.json`).
pub fn fixture_label(name: &str) -> String {
    let parts: Vec<&str> = name.rsplit('/').take(2).collect();
    parts.into_iter().rev().collect::<Vec<_>>().join("/")
}

/// The table, one line per answer; each column as wide as its widest cell.
pub fn table(rows: &[Row]) -> String {
    const HEADERS: [&str; 9] = ["FIXTURE", "ACTIVITY", "ORDER", "HTTP", "CODE", "EXPECT", "INSTANCE", "SIG", "LATENCY"];
    let cells: Vec<[String; 9]> = rows
        .iter()
        .map(|r| {
            [
                fixture_label(&r.fixture),
                r.activity.clone(),
                r.order.clone(),
                r.http_status.map_or("-".into(), |s| s.to_string()),
                if r.code.is_empty() { "-".into() } else { r.code.clone() },
                r.expect.clone(),
                r.instance_id.clone(),
                if r.signature_ok { "ok".into() } else { "BAD".into() },
                format!("{:.1}ms", r.latency.as_secs_f64() * 1000.0),
            ]
        })
        .collect();
    let mut widths = HEADERS.map(str::len);
    for row in &cells {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |row: &[String; 9]| {
        let mut out = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            // HTTP and LATENCY are numbers: right-aligned.
            if i == 3 || i == 8 {
                out.push_str(&format!("{cell:>w$}"));
            } else {
                out.push_str(&format!("{cell:<w$}"));
            }
            if i < 8 {
                out.push(' ');
            }
        }
        out
    };
    let mut out = line(&HEADERS.map(String::from)).trim_end().to_owned();
    out.push('\n');
    for (row, r) in cells.iter().zip(rows) {
        out.push_str(line(row).trim_end());
        if let Some(e) = &r.error {
            out.push_str(&format!("  ! {e}"));
        }
        out.push('\n');
    }
    out
}

/// One answer as a JSON object (`--json`).
pub fn row_json(r: &Row) -> serde_json::Value {
    serde_json::json!({
        "fixture": fixture_label(&r.fixture),
        "activity": r.activity,
        "order": r.order,
        "http_status": r.http_status,
        "code": r.code,
        "expect": r.expect,
        "instance_id": r.instance_id,
        "signature_ok": r.signature_ok,
        "latency_ms": (r.latency.as_secs_f64() * 1_000_000.0).round() / 1000.0,
        "error": r.error,
        "ok": r.ok(),
    })
}

/// A one-paragraph verdict; `None` when every answer was as expected.
pub fn verdict(rows: &[Row]) -> Option<String> {
    let bad: Vec<&Row> = rows.iter().filter(|r| !r.ok()).collect();
    if bad.is_empty() {
        return None;
    }
    let unsigned = bad.iter().filter(|r| r.http_status.is_some() && !r.signature_ok).count();
    let auth = bad.iter().filter(|r| r.code == "000001").count();
    let mut msg = format!("{} of {} answers were not as expected.", bad.len(), rows.len());
    if auth > 0 || unsigned > 0 {
        msg.push_str(&format!(
            " {auth} were refused as unauthenticated (000001) and {unsigned} carried no Body-Sign valid for this key: is --key (KOOGATE_ACCESS_KEY) the product's access key, and are the clocks in sync?"
        ));
    }
    if bad.iter().any(|r| r.http_status.is_none()) {
        msg.push_str(" Some calls got no answer at all: is the URL right and the gateway up?");
    }
    Some(msg)
}
