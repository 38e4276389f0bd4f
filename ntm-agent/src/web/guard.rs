//! What the web config asks of every request but `/healthz`: a token of
//! `rate_limit` (a token bucket over all requests), then a user's password
//! (`basic_auth_users`); refusals are counted by reason and answered with
//! 429 or 401.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use prometheus::IntCounterVec;
use warp::{Filter, http::StatusCode};

use super::auth::{BasicAuth, Verifier};
use crate::{health::self_metrics::Refused, model::sync};

/// `rate_limit`: a token bucket over all requests.
#[derive(Debug)]
pub struct RateLimit {
    interval: Duration,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimit {
    pub(super) fn new(interval: Duration, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            interval,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    /// Takes a token if there is one.
    pub fn allow(&self, now: Instant) -> bool {
        let mut state = sync::lock(&self.state);
        let (tokens, at) = *state;
        let refilled = (tokens
            + now.saturating_duration_since(at).as_secs_f64() / self.interval.as_secs_f64())
        .min(self.burst);
        if refilled >= 1.0 {
            *state = (refilled - 1.0, now);
            true
        } else {
            *state = (refilled, now);
            false
        }
    }
}

/// A request the guard refused, and why (turned into its answer by
/// [`refusal`]).
#[derive(Debug)]
struct Rejected(Refused);

impl warp::reject::Reject for Rejected {}

/// The rate limit and the users of the web config a connection started
/// with (none: every request is let in).
#[derive(Clone)]
pub(super) struct Guard {
    pub(super) rate_limit: Option<Arc<RateLimit>>,
    pub(super) auth: Option<Arc<BasicAuth>>,
    pub(super) bcrypt: Verifier,
    /// Requests refused, by reason.
    pub(super) refused: IntCounterVec,
}

impl Guard {
    async fn admit(self, authorization: Option<String>) -> Result<(), warp::Rejection> {
        if let Some(limit) = &self.rate_limit
            && !limit.allow(Instant::now())
        {
            return Err(self.refuse(Refused::RateLimited));
        }
        let Some(auth) = &self.auth else {
            return Ok(());
        };
        if self.bcrypt.admits(auth, authorization).await {
            Ok(())
        } else {
            Err(self.refuse(Refused::Unauthorized))
        }
    }

    /// Counts a refusal and makes its rejection.
    fn refuse(&self, reason: Refused) -> warp::Rejection {
        self.refused.with_label_values(&[reason.as_str()]).inc();
        warp::reject::custom(Rejected(reason))
    }

    /// The guard as a filter in front of routes.
    pub(super) fn filter(
        self,
    ) -> impl Filter<Extract = (), Error = warp::Rejection> + Clone + Send + Sync + 'static {
        warp::header::optional::<String>("authorization")
            .and_then(move |authorization| self.clone().admit(authorization))
            .untuple_one()
    }
}

/// The answer to a refused request: 401 asking for basic auth, or 429.
pub(super) async fn refusal(
    rejection: warp::Rejection,
) -> Result<warp::http::Response<String>, warp::Rejection> {
    let (status, text) = match rejection.find::<Rejected>() {
        Some(Rejected(Refused::Unauthorized)) => (StatusCode::UNAUTHORIZED, "Unauthorized\n"),
        Some(Rejected(Refused::RateLimited)) => {
            (StatusCode::TOO_MANY_REQUESTS, "Too Many Requests\n")
        }
        // The connection-level reasons never reach a route.
        Some(Rejected(Refused::ClientCertificate | Refused::TlsHandshake)) | None => {
            return Err(rejection);
        }
    };
    let mut response = warp::http::Response::new(text.to_string());
    *response.status_mut() = status;
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            warp::http::header::WWW_AUTHENTICATE,
            warp::http::HeaderValue::from_static("Basic realm=\"ntm\", charset=\"UTF-8\""),
        );
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_limit_is_a_token_bucket() {
        let limit = RateLimit::new(Duration::from_secs(1), 2);
        let t0 = Instant::now();
        assert!(limit.allow(t0));
        assert!(limit.allow(t0));
        assert!(!limit.allow(t0));
        assert!(limit.allow(t0 + Duration::from_secs(1)));
        assert!(!limit.allow(t0 + Duration::from_secs(1)));
    }
}
