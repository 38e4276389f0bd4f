//! The HTTP endpoint: `GET /metrics` (Prometheus text format),
//! `GET /healthz` (200 only while every requested interface is attached),
//! the JSON API under `/api/v1/` (see [`super::api`]) and the live page at
//! `GET /` (see [`super::page`]), served on hyper over TLS where the web
//! config says, behind its [`super::guard`].

use std::{
    future::Future,
    io,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use prometheus::{IntCounter, IntCounterVec};
use warp::{Filter, http::StatusCode};

use super::{
    api::Api,
    auth::Verifier,
    guard::{Guard, refusal},
    web_config::{WebConfig, WebConfigWatcher},
};
use crate::{health::self_metrics::Refused, model::subjects::Subject, outputs::Exposition};

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error(
        "cannot listen on {addr}: the port is already in use; stop what uses it or choose another with -p/--port (NTM_PORT)"
    )]
    PortTaken { addr: SocketAddr },
    #[error(
        "cannot listen on {addr}: that address is not on this machine; choose one of its addresses (or 0.0.0.0) with -b/--bind_ip (NTM_BIND)"
    )]
    AddressNotAvailable { addr: SocketAddr },
    #[error("cannot listen on {addr}: {source}")]
    Other {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Binds the listening socket now, so that a taken port or a foreign
/// address is reported at start, with what to do about it.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, HttpError> {
    let classify = |source: io::Error| match source.kind() {
        io::ErrorKind::AddrInUse => HttpError::PortTaken { addr },
        io::ErrorKind::AddrNotAvailable => HttpError::AddressNotAvailable { addr },
        _ => HttpError::Other { addr, source },
    };
    let listener = std::net::TcpListener::bind(addr).map_err(classify)?;
    listener.set_nonblocking(true).map_err(classify)?;
    Ok(listener)
}

/// How long a client may take to send its request headers; a slower one
/// is disconnected (it would otherwise hold a connection open for ever).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long requests in flight may take to finish once the server stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// What the endpoint serves, and how it counts what it refuses.
pub struct Site {
    pub exposition: Exposition,
    pub api: Api,
    /// `--web-config-file`, loaded (None: plain HTTP, open to all).
    pub web: Option<WebConfigWatcher>,
    /// Connections that ended in an error.
    pub connection_errors: IntCounter,
    /// Requests and connections the web config refused, by reason.
    pub refused: IntCounterVec,
}

/// The endpoint, on a thread of its own: encoding a large scrape never
/// delays a drain, and a slow drain never delays a scrape.
pub struct Server {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Serves `site` on `listener`; connections that end in an error (a
    /// client that went away mid-request, a bad request, headers too slow,
    /// a failed TLS handshake) are counted and logged at debug level only,
    /// so that no client can flood the log.
    pub fn start(listener: std::net::TcpListener, site: Site) -> io::Result<Self> {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name("ntm-http".into())
            .spawn(move || {
                runtime.block_on(async move {
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => {
                            serve(listener, site, async {
                                let _ = stopped.await;
                            })
                            .await
                        }
                        Err(e) => log::error!("metrics endpoint: {e}"),
                    }
                })
            })?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Stops accepting, lets requests in flight finish (briefly), and joins
    /// the thread.
    pub fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Serves until `shutdown` completes.
async fn serve(
    listener: tokio::net::TcpListener,
    mut site: Site,
    shutdown: impl Future<Output = ()>,
) {
    let bcrypt = Verifier::new();
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: wait a moment, go on.
                    log::debug!("metrics endpoint: accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            // Reap finished connections as they end.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        // The configuration as it is now (renewed certificates, changed
        // passwords): each connection uses the one it started with.
        let web = site.web.as_mut().map(|w| w.current(Instant::now()));
        let guard = Guard {
            rate_limit: web.as_ref().and_then(|w| w.rate_limit.clone()),
            auth: web.as_ref().and_then(|w| w.auth.clone()),
            bcrypt: bcrypt.clone(),
            refused: site.refused.clone(),
        };
        let service = TowerToHyperService::new(warp::service(routes(
            site.exposition.clone(),
            site.api.clone(),
            web.as_deref(),
            guard,
        )));
        let errors = site.connection_errors.clone();
        let refused = site.refused.clone();
        connections.spawn(async move {
            let tls = web.as_ref().and_then(|w| w.tls.clone());
            let served = match tls {
                None => serve_connection(stream, service).await,
                Some(tls) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&tls.config));
                    let stream =
                        match tokio::time::timeout(HEADER_READ_TIMEOUT, acceptor.accept(stream))
                            .await
                        {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(e)) => {
                                refused
                                    .with_label_values(&[Refused::TlsHandshake.as_str()])
                                    .inc();
                                log::debug!("metrics endpoint: TLS handshake failed: {e}");
                                return;
                            }
                            Err(_) => {
                                refused
                                    .with_label_values(&[Refused::TlsHandshake.as_str()])
                                    .inc();
                                log::debug!("metrics endpoint: TLS handshake timed out");
                                return;
                            }
                        };
                    if !tls.client_allowed(stream.get_ref().1.peer_certificates()) {
                        refused
                            .with_label_values(&[Refused::ClientCertificate.as_str()])
                            .inc();
                        log::debug!(
                            "metrics endpoint: a client certificate without an allowed SAN"
                        );
                        return;
                    }
                    serve_connection(stream, service).await
                }
            };
            if let Err(e) = served {
                errors.inc();
                log::debug!("metrics endpoint: connection ended with an error: {e}");
            }
        });
    }
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    });
    if drained.await.is_err() {
        connections.abort_all();
    }
}

/// HTTP/1.1 on one connection, plain or TLS.
async fn serve_connection<S, I>(io: I, service: S) -> Result<(), hyper::Error>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::ResBody: 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(io), service)
        .await
}

/// A JSON document, or the API's error as one.
fn json_reply(result: Result<String, super::api::ApiError>) -> warp::http::Response<String> {
    let (status, body) = match result {
        Ok(body) => (StatusCode::OK, body),
        Err(e) => (
            StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST),
            e.body(),
        ),
    };
    let mut response = warp::http::Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        warp::http::header::CONTENT_TYPE,
        warp::http::HeaderValue::from_static("application/json"),
    );
    headers.insert(
        warp::http::header::CACHE_CONTROL,
        warp::http::HeaderValue::from_static("no-store"),
    );
    response
}

/// `/api/v1/...`: devices, servers, services, interfaces, status, history,
/// connections.
fn api_routes(
    api: Api,
) -> impl Filter<Extract = (impl warp::Reply,), Error = warp::Rejection> + Clone + Send + Sync + 'static
{
    type Params = std::collections::HashMap<String, String>;
    let query = || warp::query::<Params>();
    let (a, b, c, d, e, f, g) = (
        api.clone(),
        api.clone(),
        api.clone(),
        api.clone(),
        api.clone(),
        api.clone(),
        api,
    );
    let devices = warp::path!("api" / "v1" / "devices")
        .and(query())
        .map(move |q: Params| json_reply(a.devices(&q)));
    let servers = warp::path!("api" / "v1" / "servers")
        .and(query())
        .map(move |q: Params| json_reply(b.top(Subject::Server, &q)));
    let services = warp::path!("api" / "v1" / "services")
        .and(query())
        .map(move |q: Params| json_reply(c.top(Subject::Service, &q)));
    let interfaces = warp::path!("api" / "v1" / "interfaces")
        .and(query())
        .map(move |q: Params| json_reply(d.interfaces(&q)));
    let status = warp::path!("api" / "v1" / "status").map(move || json_reply(Ok(e.status())));
    let history = warp::path!("api" / "v1" / "history")
        .and(query())
        .map(move |q: Params| json_reply(f.history(&q)));
    let connections = warp::path!("api" / "v1" / "connections")
        .and(query())
        .map(move |q: Params| json_reply(g.connections(&q)));
    warp::get().and(
        devices
            .or(servers)
            .or(services)
            .or(interfaces)
            .or(status)
            .or(history)
            .or(connections),
    )
}

/// `/healthz` (open, for probes), and behind the web config's guard
/// `/metrics`, `/api/v1/...` and the page (`/` and its files); every
/// answer says `nosniff`, so that no browser reads a name in it as markup,
/// carries the page's Content-Security-Policy, and the web config's
/// headers (which may replace those).
fn routes(
    exposition: Exposition,
    api: Api,
    web: Option<&WebConfig>,
    guard: Guard,
) -> impl Filter<Extract = (impl warp::Reply,), Error = warp::Rejection> + Clone + Send + Sync + 'static
{
    let mut headers = warp::http::HeaderMap::new();
    headers.insert(
        "x-content-type-options",
        warp::http::HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        warp::http::header::CONTENT_SECURITY_POLICY,
        warp::http::HeaderValue::from_static(super::page::CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        warp::http::header::REFERRER_POLICY,
        warp::http::HeaderValue::from_static("no-referrer"),
    );
    for (name, value) in web.iter().flat_map(|w| w.headers.iter()) {
        headers.insert(name.clone(), value.clone());
    }
    let health = api.health.clone();
    let metrics = warp::path("metrics")
        .and(warp::path::end())
        .and(warp::get())
        .map(move || {
            let (body, status, content_type) = match exposition.encode() {
                Ok(body) => (body, StatusCode::OK, prometheus::TEXT_FORMAT),
                Err(e) => (
                    format!("encoding metrics failed: {e}\n"),
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                ),
            };
            let mut response = warp::http::Response::new(body);
            *response.status_mut() = status;
            response.headers_mut().insert(
                warp::http::header::CONTENT_TYPE,
                warp::http::HeaderValue::from_static(content_type),
            );
            response
        });
    let healthz = warp::path("healthz")
        .and(warp::path::end())
        .and(warp::get())
        .map(move || {
            let (healthy, text) = health.report();
            let status = if healthy {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            warp::reply::with_status(text, status)
        });
    let guarded = guard
        .filter()
        .and(metrics.or(api_routes(api)).or(super::page::routes()));
    healthz
        .or(guarded)
        .recover(refusal)
        .with(warp::reply::with::headers(headers))
}
