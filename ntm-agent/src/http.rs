//! The HTTP endpoint: `GET /metrics` (Prometheus text format) and
//! `GET /healthz` (200 only while every requested interface is attached).

use std::{
    collections::BTreeMap,
    future::Future,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use crate::metrics::Exposition;
use warp::{Filter, http::StatusCode};

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

/// Attach state per interface, shared between the agent and `/healthz`.
#[derive(Clone, Default)]
pub struct Health {
    interfaces: Arc<Mutex<BTreeMap<String, bool>>>,
}

impl Health {
    pub fn set(&self, iface: &str, attached: bool) {
        if let Ok(mut map) = self.interfaces.lock() {
            map.insert(iface.to_string(), attached);
        }
    }

    /// (healthy, one line per interface)
    pub fn report(&self) -> (bool, String) {
        let Ok(map) = self.interfaces.lock() else {
            return (false, "health state unavailable\n".to_string());
        };
        let mut text = String::new();
        for (iface, attached) in map.iter() {
            let state = if *attached {
                "attached"
            } else {
                "NOT attached"
            };
            text.push_str(&format!("{iface}: {state}\n"));
        }
        let healthy = !map.is_empty() && map.values().all(|a| *a);
        (healthy, text)
    }
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

/// The endpoint, on a thread of its own: encoding a large scrape never
/// delays a drain, and a slow drain never delays a scrape.
pub struct Server {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    pub fn start(
        listener: std::net::TcpListener,
        exposition: Exposition,
        health: Health,
    ) -> io::Result<Self> {
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
                            serve(listener, exposition, health, async {
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

    /// Stops accepting, finishes requests in flight, and joins the thread.
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
    exposition: Exposition,
    health: Health,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
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
    let root = warp::path::end().map(|| {
        warp::reply::html(String::from(
            "<html><body><h1>ntm</h1><p><a href=\"/metrics\">/metrics</a> \
             <a href=\"/healthz\">/healthz</a></p></body></html>",
        ))
    });
    warp::serve(metrics.or(healthz).or(root))
        .incoming(listener)
        .graceful(shutdown)
        .run()
        .await;
}
