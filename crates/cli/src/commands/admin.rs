//! `ferroserve limits` and `ferroserve reload`: the operator's side of live admission changes, through the
//! `Admin` service (admin credential required).

use anyhow::Context;
use clap::Args;
use ferroserve_proto::v1 as pb;
use ferroserve_proto::v1::admin_client::AdminClient;

/// Where the Admin service is and how to get in.
#[derive(Debug, Args)]
pub struct AdminConn {
    /// Server address (`https://` for TLS).
    #[arg(long, env = "FERROSERVE_ADDR", default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// CA certificate (PEM) to trust for an https:// address [default: the system's roots].
    #[arg(long, env = "FERROSERVE_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// The admin credential, sent as `authorization: Bearer <token>`.
    #[arg(long, env = "FERROSERVE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
}

/// Shows the admission limits, or changes them when any limit flag is given.
#[derive(Debug, Args)]
pub struct LimitsArgs {
    /// Connection.
    #[command(flatten)]
    pub conn: AdminConn,
    /// The tenant to change; leave out to change the server-wide limits.
    #[arg(long)]
    pub tenant: Option<String>,
    /// Requests per second (0 removes the limit).
    #[arg(long)]
    pub requests_per_second: Option<f64>,
    /// Request burst.
    #[arg(long)]
    pub request_burst: Option<u32>,
    /// Tokens per minute (0 removes the limit).
    #[arg(long)]
    pub tokens_per_minute: Option<f64>,
    /// Token burst.
    #[arg(long)]
    pub token_burst: Option<u32>,
    /// Requests in flight at once (0 removes a tenant's cap).
    #[arg(long)]
    pub max_in_flight: Option<u32>,
    /// Server only: requests that may wait.
    #[arg(long)]
    pub max_queued_requests: Option<u32>,
    /// Server only: tokens the waiting requests may reserve.
    #[arg(long)]
    pub max_queued_tokens: Option<u64>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub(crate) fn with_token<T>(message: T, token: &Option<String>) -> anyhow::Result<tonic::Request<T>> {
    let mut r = tonic::Request::new(message);
    if let Some(t) = token {
        let value = format!("Bearer {t}")
            .parse()
            .context("the admin token must be printable ASCII")?;
        r.metadata_mut().insert("authorization", value);
    }
    Ok(r)
}

/// An admin call carrying the credential and the operator's name (`x-ferroserve-operator`), which the server
/// records with version and filter changes.
pub(crate) fn operator_request<T>(conn: &AdminConn, operator: &str, message: T) -> anyhow::Result<tonic::Request<T>> {
    let mut r = with_token(message, &conn.admin_token)?;
    r.metadata_mut().insert(
        "x-ferroserve-operator",
        operator.parse().context("--operator must be printable ASCII")?,
    );
    Ok(r)
}

pub(crate) async fn connect(conn: &AdminConn) -> anyhow::Result<AdminClient<tonic::transport::Channel>> {
    Ok(AdminClient::new(super::channel(&conn.addr, &conn.tls_ca).await?))
}

pub(crate) fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}

fn num<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

fn row(s: &pb::LimitsState) -> String {
    let l = s.limits.unwrap_or_default();
    let name = if s.tenant.is_empty() { "(server)" } else { &s.tenant };
    format!(
        "{name:<12} {:>8} {:>6} {:>10} {:>8} {:>6} {:>10} {:>10} {:>7} {:>6}",
        num(l.requests_per_second),
        num(l.request_burst),
        num(l.tokens_per_minute),
        num(l.token_burst),
        num(l.max_in_flight),
        num(s.remaining_requests.map(|r| format!("{r:.1}"))),
        num(s.remaining_tokens.map(|r| format!("{r:.0}"))),
        s.running,
        s.queued
    )
}

const HEADER: &str = "tenant            req/s  burst   tokens/m    burst  inflt   req left   tok left running queued";

/// `ferroserve limits`.
pub async fn limits(a: LimitsArgs) -> anyhow::Result<()> {
    let mut client = connect(&a.conn).await?;
    let patch = pb::Limits {
        requests_per_second: a.requests_per_second,
        request_burst: a.request_burst,
        tokens_per_minute: a.tokens_per_minute,
        token_burst: a.token_burst,
        max_in_flight: a.max_in_flight,
        max_queued_requests: a.max_queued_requests,
        max_queued_tokens: a.max_queued_tokens,
    };
    if patch != pb::Limits::default() {
        let request = pb::SetLimitsRequest {
            tenant: a.tenant.clone().unwrap_or_default(),
            limits: Some(patch),
        };
        let applied = client
            .set_limits(with_token(request, &a.conn.admin_token)?)
            .await
            .map_err(status_error)?
            .into_inner()
            .applied
            .unwrap_or_default();
        println!("applied:");
        println!("{HEADER}\n{}", row(&applied));
        return Ok(());
    }
    let all = client
        .get_limits(with_token(pb::GetLimitsRequest {}, &a.conn.admin_token)?)
        .await
        .map_err(status_error)?
        .into_inner();
    if a.json {
        let state = |s: &pb::LimitsState| {
            let l = s.limits.unwrap_or_default();
            serde_json::json!({
                "tenant": s.tenant, "requests_per_second": l.requests_per_second, "request_burst": l.request_burst,
                "tokens_per_minute": l.tokens_per_minute, "token_burst": l.token_burst,
                "max_in_flight": l.max_in_flight, "max_queued_requests": l.max_queued_requests,
                "max_queued_tokens": l.max_queued_tokens, "remaining_requests": s.remaining_requests,
                "remaining_tokens": s.remaining_tokens, "running": s.running, "queued": s.queued,
            })
        };
        let json = serde_json::json!({
            "server": all.server.as_ref().map(state),
            "tenants": all.tenants.iter().map(state).collect::<Vec<_>>(),
        });
        println!("{json}");
        return Ok(());
    }
    println!("{HEADER}");
    if let Some(s) = &all.server {
        println!("{}", row(s));
    }
    for t in &all.tenants {
        println!("{}", row(t));
    }
    Ok(())
}

/// `ferroserve reload`.
pub async fn reload(conn: AdminConn) -> anyhow::Result<()> {
    let summary = connect(&conn)
        .await?
        .reload_config(with_token(pb::ReloadConfigRequest {}, &conn.admin_token)?)
        .await
        .map_err(status_error)?
        .into_inner()
        .summary;
    println!("reloaded: {summary}");
    Ok(())
}
