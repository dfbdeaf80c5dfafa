//! The admin API client the CLI commands share: bearer token, JSON, errors as `code: message`.

use std::io::Read;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

/// Where the admin API is and who calls it.
#[derive(clap::Args, Debug, Clone)]
pub struct ClientArgs {
    /// The admin API of any coordinator.
    #[arg(
        long,
        env = "SOPHON_SERVER",
        default_value = "http://127.0.0.1:7400",
        global = true
    )]
    pub server: String,
    /// A bearer token (from `coordinator init`, `sophon dev` or `token create`).
    #[arg(long, env = "SOPHON_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// The CA certificate (PEM) that an `https://` server's certificate must chain to: the
    /// cluster CA (`ca.pem` in a coordinator's data directory) or your own.
    #[arg(long, env = "SOPHON_CA", global = true)]
    pub ca: Option<std::path::PathBuf>,
}

/// A connection to the admin API.
pub struct Client {
    agent: ureq::Agent,
    base: String,
    token: Option<String>,
    pub json: bool,
}

impl Client {
    pub fn new(args: &ClientArgs) -> anyhow::Result<Client> {
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(600)));
        if args.server.starts_with("https://") {
            let Some(ca) = &args.ca else {
                bail!(
                    "{} is https: pass --ca (or SOPHON_CA) with the CA certificate its \
                     certificate chains to (the cluster's is ca.pem in a coordinator's data \
                     directory)",
                    args.server
                );
            };
            let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
            let roots = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(cert)) => Some(cert),
                    _ => None,
                })
                .collect::<Vec<_>>();
            if roots.is_empty() {
                bail!("{} holds no PEM certificate", ca.display());
            }
            let tls = ureq::tls::TlsConfig::builder()
                .root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(roots)))
                .build();
            config = config.tls_config(tls);
        } else if !args.server.starts_with("http://") {
            bail!(
                "--server must start with http:// or https://, not {}",
                args.server
            );
        }
        Ok(Client {
            agent: ureq::Agent::new_with_config(config.build()),
            base: args.server.trim_end_matches('/').to_string(),
            token: args.token.clone(),
            json: args.json,
        })
    }

    fn auth(&self) -> anyhow::Result<String> {
        match &self.token {
            Some(t) => Ok(format!("Bearer {t}")),
            None => bail!("no token: pass --token or set SOPHON_TOKEN"),
        }
    }

    fn finish(&self, mut response: ureq::http::Response<ureq::Body>) -> anyhow::Result<Value> {
        let status = response.status();
        let text = response
            .body_mut()
            .with_config()
            .limit(256 << 20)
            .read_to_string()
            .context("reading the answer")?;
        let value: Value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if status.is_success() {
            return Ok(value);
        }
        let code = value["error"]["code"].as_str().unwrap_or("error");
        let message = value["error"]["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| value.to_string());
        bail!("{} ({code}, HTTP {})", message, status.as_u16())
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn get(&self, path: &str) -> anyhow::Result<Value> {
        let response = self
            .agent
            .get(self.url(path))
            .header("Authorization", self.auth()?)
            .call()
            .with_context(|| format!("calling {}", self.base))?;
        self.finish(response)
    }

    pub fn send(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let url = self.url(path);
        let auth = self.auth()?;
        let response = match (method, body) {
            ("DELETE", _) => self.agent.delete(url).header("Authorization", auth).call(),
            ("PUT", Some(b)) => self
                .agent
                .put(url)
                .header("Authorization", auth)
                .send_json(b),
            ("PUT", None) => self
                .agent
                .put(url)
                .header("Authorization", auth)
                .send_empty(),
            (_, Some(b)) => self
                .agent
                .post(url)
                .header("Authorization", auth)
                .send_json(b),
            (_, None) => self
                .agent
                .post(url)
                .header("Authorization", auth)
                .send_empty(),
        }
        .with_context(|| format!("calling {}", self.base))?;
        self.finish(response)
    }

    /// A raw download (a bundle by digest).
    pub fn get_bytes(&self, path: &str) -> anyhow::Result<Vec<u8>> {
        let mut response = self
            .agent
            .get(self.url(path))
            .header("Authorization", self.auth()?)
            .call()
            .with_context(|| format!("calling {}", self.base))?;
        if !response.status().is_success() {
            return self.finish(response).map(|_| Vec::new());
        }
        response
            .body_mut()
            .with_config()
            .limit(4 << 30)
            .read_to_vec()
            .context("reading the download")
    }

    /// Posts raw bytes from `reader` (`len` bytes), e.g. a bundle.
    pub fn upload(
        &self,
        path: &str,
        reader: impl Read + 'static,
        len: u64,
    ) -> anyhow::Result<Value> {
        let response = self
            .agent
            .post(self.url(path))
            .header("Authorization", self.auth()?)
            .header("Content-Type", "application/octet-stream")
            .header("Content-Length", len.to_string())
            .send(ureq::SendBody::from_owned_reader(reader))
            .with_context(|| format!("calling {}", self.base))?;
        self.finish(response)
    }

    /// Prints `value` as JSON, or as a table through `table`.
    pub fn print(&self, value: &Value, table: impl FnOnce(&Value) -> Table) {
        if self.json {
            println!(
                "{}",
                serde_json::to_string_pretty(value).unwrap_or_default()
            );
        } else {
            print!("{}", table(value));
        }
    }
}

/// A plain text table with aligned columns.
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Table {
        Table {
            headers: headers.iter().map(|h| h.to_uppercase()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Key/value lines for one object.
    pub fn fields(pairs: &[(&str, String)]) -> Table {
        let mut t = Table::new(&["field", "value"]);
        for (k, v) in pairs {
            t.row(vec![k.to_string(), v.clone()]);
        }
        t
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                if i < widths.len() {
                    widths[i] = widths[i].max(cell.chars().count());
                }
            }
        }
        let line = |f: &mut std::fmt::Formatter<'_>, cells: &[String]| {
            let mut out = String::new();
            for (i, cell) in cells.iter().enumerate() {
                let w = widths.get(i).copied().unwrap_or(0);
                if i + 1 == cells.len() {
                    out.push_str(cell);
                } else {
                    out.push_str(&format!("{cell:<w$}  "));
                }
            }
            writeln!(f, "{}", out.trim_end())
        };
        line(f, &self.headers)?;
        for row in &self.rows {
            line(f, row)?;
        }
        if self.rows.is_empty() {
            writeln!(f, "(none)")?;
        }
        Ok(())
    }
}

/// A JSON value as a table cell.
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(items) => items.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// A time in ms since the epoch, as UTC.
pub fn time(v: &Value) -> String {
    let Some(ms) = v.as_u64() else {
        return "-".into();
    };
    let secs = (ms / 1000) as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
