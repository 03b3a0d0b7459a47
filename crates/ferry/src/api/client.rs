//! `ferry vm ...`: a small HTTP/1.1 client over the API's Unix socket (hyper).
use crate::cli::{VmAction, VmArgs};
use anyhow::{bail, Context, Result};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use std::path::Path;

/// Sends one request; returns the status code and body.
pub async fn request(socket: &Path, method: Method, uri: &str) -> Result<(u16, String)> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("cannot connect to API socket {}", socket.display()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("API handshake")?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())
        .context("building request")?;
    let resp = sender.send_request(req).await.context("API request")?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .context("API response")?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

pub fn main(args: VmArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (method, uri) = match args.action {
        VmAction::Info => (Method::GET, "/vm"),
        VmAction::Pause => (Method::PUT, "/vm/pause"),
        VmAction::Resume => (Method::PUT, "/vm/resume"),
        VmAction::Shutdown => (Method::PUT, "/vm/shutdown"),
    };
    let (status, body) = rt.block_on(request(&args.api_socket, method, uri))?;
    if !(200..300).contains(&status) {
        let msg = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or(body);
        bail!("{msg}");
    }
    if !body.is_empty() {
        let v: serde_json::Value = serde_json::from_str(&body).context("API answer")?;
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    Ok(())
}
