//! The admin listener (loopback by default, separate from the data plane): `/health`,
//! `/ready`, `/metrics`, `/load-stats`, `/explain` (a dry run of the selection for a
//! request body), `/dashboard`, and vLLM's `/v1/load_lora_adapter` and
//! `/v1/unload_lora_adapter` for the whole fleet (`crate::admin::lora`). With `admin.token_file` set,
//! everything but `/health`, `/ready` and the dashboard's page requires
//! `Authorization: Bearer TOKEN`. The page holds no data: it asks for the token and sends
//! it with its own `/load-stats` requests.

pub mod gauges;
pub mod lora;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::auth;
use crate::config::Config;
use crate::fleet::{Fleet, FleetSnapshot};
use crate::metrics;
use crate::routing;

/// The live dashboard: one self-contained page (no external assets) that polls
/// `/load-stats`.
const DASHBOARD: &str = include_str!("dashboard.html");

pub struct AdminApp {
    pub config: Arc<ArcSwap<Config>>,
    pub fleet: Arc<Fleet>,
    /// Set once every listener accepts connections.
    pub ready: Arc<AtomicBool>,
    pub history: Arc<History>,
    /// The data plane's placement of long-lived affinity keys.
    pub placer: Arc<crate::routing::affinity::Placer>,
}

/// Samples kept for the dashboard's sparklines (one a second): a page opened now shows
/// the last minute and a half at once.
pub const HISTORY_SAMPLES: usize = 90;
pub const HISTORY_PERIOD: Duration = Duration::from_secs(1);

/// One second of the fleet, as the dashboard draws it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sample {
    /// Unix time, ms.
    pub t_ms: u64,
    pub requests_total: u64,
    pub errors_5xx_total: u64,
    pub backends: Vec<BackendSample>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BackendSample {
    pub name: String,
    pub running: Option<f64>,
    pub waiting: Option<f64>,
    pub kv_usage: Option<f64>,
    pub in_flight: usize,
    pub requests_total: u64,
}

/// The recent samples, oldest first (`GET /load-stats?history=1`).
#[derive(Debug, Default)]
pub struct History {
    samples: Mutex<VecDeque<Sample>>,
}

impl History {
    pub fn record(&self, config: &Config, snap: &FleetSnapshot) {
        let now = Instant::now();
        let fresh = crate::fleet::fresh_since(now, config.stale_after());
        let answered = metrics::sums_by(&metrics::REQUESTS, "backend");
        let by_class = metrics::sums_by(&metrics::REQUESTS, "status_class");
        let sample = Sample {
            t_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            requests_total: by_class.values().sum(),
            errors_5xx_total: by_class.get("5xx").copied().unwrap_or(0),
            backends: snap
                .backends
                .iter()
                .map(|e| {
                    let l = e.state.fresh_load(fresh);
                    BackendSample {
                        name: e.backend.name.clone(),
                        running: l.and_then(|l| l.running),
                        waiting: l.and_then(|l| l.waiting),
                        kv_usage: l.and_then(|l| l.kv_usage),
                        in_flight: e.backend.in_flight(),
                        requests_total: answered.get(&e.backend.name).copied().unwrap_or(0),
                    }
                })
                .collect(),
        };
        let mut samples = self.samples.lock().expect("not poisoned");
        if samples.len() == HISTORY_SAMPLES {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    pub fn samples(&self) -> Vec<Sample> {
        self.samples
            .lock()
            .expect("not poisoned")
            .iter()
            .cloned()
            .collect()
    }
}

/// Records a [`History`] sample every [`HISTORY_PERIOD`].
pub struct HistorySampler {
    pub config: Arc<ArcSwap<Config>>,
    pub fleet: Arc<Fleet>,
    pub history: Arc<History>,
}

#[async_trait]
impl BackgroundService for HistorySampler {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(HISTORY_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                r = shutdown.changed() => {
                    if r.is_err() || *shutdown.borrow() { return; }
                }
                _ = tick.tick() => self.history.record(&self.config.load(), &self.fleet.load()),
            }
        }
    }
}

fn reply(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .body(body)
        .expect("static response parts are valid")
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        // `/health` and `/ready` tell nothing worth a token, and probes rarely carry one.
        if !matches!(path.as_str(), "/health" | "/ready" | "/dashboard") {
            if let Some(token) = &self.config.load().admin_token {
                let presented = session
                    .req_header()
                    .headers
                    .get(http::header::AUTHORIZATION)
                    .and_then(|v| auth::bearer(v.as_bytes()));
                if !presented.is_some_and(|p| token.matches(p)) {
                    let mut r = reply(
                        401,
                        "application/json",
                        b"{\"error\":\"the admin API needs its token: Authorization: Bearer TOKEN\"}"
                            .to_vec(),
                    );
                    r.headers_mut().insert(
                        http::header::WWW_AUTHENTICATE,
                        http::HeaderValue::from_static("Bearer"),
                    );
                    return r;
                }
            }
        }
        match path.as_str() {
            "/health" => reply(200, "application/json", b"{\"status\":\"ok\"}".to_vec()),
            "/ready" => {
                let healthy = self
                    .fleet
                    .load()
                    .backends
                    .iter()
                    .filter(|b| b.backend.health.routable())
                    .count();
                let ready = self.ready.load(Ordering::Relaxed) && healthy > 0;
                let body = format!("{{\"ready\":{ready},\"healthy_backends\":{healthy}}}");
                reply(
                    if ready { 200 } else { 503 },
                    "application/json",
                    body.into_bytes(),
                )
            }
            "/dashboard" => reply(
                200,
                "text/html; charset=utf-8",
                DASHBOARD.as_bytes().to_vec(),
            ),
            "/metrics" => reply(
                200,
                "text/plain; version=0.0.4",
                gauges::render(&self.fleet.load(), self.config.load().stale_after()),
            ),
            "/load-stats" => {
                let mut v = load_stats(&self.config.load(), &self.fleet.load(), Instant::now());
                v["affinity_placement"] = placement_stats(&self.placer.placement());
                let query = session.req_header().uri.query().unwrap_or("");
                if query.split('&').any(|p| p == "history=1") {
                    v["history"] = serde_json::to_value(self.history.samples()).unwrap_or_default();
                }
                reply(
                    200,
                    "application/json",
                    serde_json::to_vec_pretty(&v).unwrap_or_default(),
                )
            }
            "/explain" => self.explain_request(session).await,
            p if crate::admin::lora::Op::of(p).is_some() => {
                let op = crate::admin::lora::Op::of(p).expect("matched");
                self.lora_request(session, op).await
            }
            _ => reply(
                404,
                "application/json",
                b"{\"error\":\"not found\"}".to_vec(),
            ),
        }
    }
}

impl AdminApp {
    /// `POST /explain`: the body is an inference request as a client would send it (JSON,
    /// or an audio form with its `Content-Type`; the session header counts too); the
    /// answer is [`explain`]'s. The request is not sent anywhere.
    /// The body of a `POST` to the admin API, held to the data plane's limits and pace
    /// (`proxy::body`); or the answer refusing it (another method, too large, too slow).
    async fn post_body(
        session: &mut ServerSession,
        cfg: &Config,
        what: &str,
    ) -> Result<Vec<u8>, Response<Vec<u8>>> {
        let refuse =
            |e: crate::openai::ApiError| reply(e.status, "application/json", e.body().to_vec());
        if session.req_header().method != http::Method::POST {
            let body = serde_json::json!({ "error": format!("POST {what}") });
            let mut r = reply(405, "application/json", body.to_string().into_bytes());
            r.headers_mut()
                .insert(http::header::ALLOW, http::HeaderValue::from_static("POST"));
            return Err(r);
        }
        let (limit, pace) = (
            cfg.limits.max_body_bytes,
            crate::proxy::body::BodyPace::of(&cfg.limits),
        );
        let started = Instant::now();
        let mut body = Vec::new();
        loop {
            let by = pace.deadline(started, body.len(), Instant::now());
            match tokio::time::timeout_at(by.into(), session.read_request_body()).await {
                Err(_) => return Err(refuse(crate::openai::ApiError::body_timeout())),
                Ok(Err(_)) => {
                    return Err(refuse(crate::openai::ApiError::bad_request(
                        "The request body could not be read.",
                        None,
                    )))
                }
                Ok(Ok(None)) => return Ok(body),
                Ok(Ok(Some(chunk))) if body.len() + chunk.len() > limit => {
                    return Err(refuse(crate::openai::ApiError::body_too_large(limit)))
                }
                Ok(Ok(Some(chunk))) => body.extend_from_slice(&chunk),
            }
        }
    }

    /// `POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter` (`?model=BASE` to
    /// reach only the replicas serving it): see [`crate::admin::lora`].
    async fn lora_request(
        &self,
        session: &mut ServerSession,
        op: crate::admin::lora::Op,
    ) -> Response<Vec<u8>> {
        let cfg = self.config.load();
        let body = match Self::post_body(session, &cfg, "vLLM's LoRA request body").await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let query = session.req_header().uri.query().unwrap_or("");
        let base = form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == "model")
            .map(|(_, v)| v.into_owned());
        let out = crate::admin::lora::apply(&self.fleet, &cfg, op, &body, base.as_deref()).await;
        reply(out.status, out.content_type, out.body)
    }

    async fn explain_request(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let cfg = self.config.load();
        let refuse =
            |e: crate::openai::ApiError| reply(e.status, "application/json", e.body().to_vec());
        let what = "the request body to explain, as a client would send it";
        let body = match Self::post_body(session, &cfg, what).await {
            Ok(b) => b,
            Err(r) => return r,
        };
        let headers = &session.req_header().headers;
        let content_type = headers
            .get(http::header::CONTENT_TYPE)
            .map(|v| v.as_bytes());
        let info =
            match crate::openai::inspect_request(content_type, &body, cfg.limits.max_json_depth) {
                Ok(info) => info,
                Err(e) => return refuse(e),
            };
        // Explained as the request path sends it: with the default model or an alias's
        // model written in.
        let renamed =
            match routing::route_model(&self.fleet.load(), &cfg, content_type, &body, &info) {
                Ok(r) => r,
                Err(e) => return refuse(e),
            };
        let (defaulted, alias) = renamed
            .as_ref()
            .map_or((false, None), |r| (r.defaulted, r.alias.clone()));
        let (body, info) = match renamed {
            Some(r) => (r.body, r.info),
            None => (body, info),
        };
        let key = crate::routing::affinity::request_key(&cfg, headers, &body, &info);
        let mut v = explain(
            &cfg,
            &self.fleet.load(),
            &self.placer,
            &info,
            key,
            Instant::now(),
        );
        v["request"]["model_defaulted"] = defaulted.into();
        v["request"]["model_alias"] = alias.into();
        reply(
            200,
            "application/json",
            serde_json::to_vec_pretty(&v).unwrap_or_default(),
        )
    }
}

/// What the gateway would do with a request now, and why (`POST /explain`): a dry run of
/// the selection the request path makes, which changes nothing (no rotation step, no
/// placement record, no counter). `info` and `key` are what the request path reads of the
/// request (its body's routing fields, its affinity key).
pub fn explain(
    cfg: &Config,
    snap: &FleetSnapshot,
    placer: &crate::routing::affinity::Placer,
    info: &crate::openai::RoutingInfo,
    key: Option<crate::routing::affinity::AffinityKey>,
    now: Instant,
) -> serde_json::Value {
    use serde_json::json;
    let req = routing::Request::of(info, key, cfg, placer);
    let stale_after = cfg.stale_after();
    let scorer = routing::Scorer::new(snap, &req, crate::fleet::fresh_since(now, stale_after));
    // Scratch selectors: the live one's round-robin cursors must not move. (So
    // `round-robin` shows an order, not whose turn it is.)
    let order = routing::Selector::new(stale_after).candidates(cfg.policy, snap, &req, &[], now);
    let choice = routing::Selector::new(stale_after).best(cfg.policy, snap, &req, &[], now);
    let sticky = req.affinity.as_ref();
    let request = json!({
        "model": info.model,
        "stream": info.stream,
        "prompt_tokens_estimate": req.prompt_tokens,
        "max_tokens": info.max_tokens,
        "affinity_key": sticky.map(|s| json!({
            "source": s.key.source.as_str(),
            "reusable_prefix_tokens": s.key.reusable_bytes / routing::BYTES_PER_TOKEN,
        })),
    });
    let candidate = |i: usize| {
        let e = &snap.backends[i];
        let t = scorer.terms(snap, i);
        json!({
            "backend": e.backend.name,
            "score_ms": ms(Some(t.score)),
            "terms_ms": {
                "step": ms(Some(t.step)),
                "prefill": ms(Some(t.prefill)),
                "queue": ms(Some(t.queue)),
                "kv_pressure": ms(Some(t.pressure)),
                "lora_slot": ms(Some(t.lora)),
            },
            "scrape_fresh": t.fresh,
            // For a LoRA adapter: whether it holds a slot there, would take a free one,
            // or would wait for one.
            "lora": match t.lora_fit {
                crate::engine::metrics::LoraFit::Unknown => None,
                crate::engine::metrics::LoraFit::Active => Some("holds a slot"),
                crate::engine::metrics::LoraFit::Free => Some("free slot"),
                crate::engine::metrics::LoraFit::Full => Some("no slot free"),
            },
            "sequences": (t.sequences * 100.0).round() / 100.0,
            "in_flight": e.backend.in_flight(),
        })
    };
    let (choice, why_none) = match (&choice, &order) {
        (Ok(c), _) => (
            json!({
                "backend": snap.backends[c.index].backend.name,
                "reason": c.reason.as_str(),
                "score_ms": ms(c.score_s),
            }),
            None,
        ),
        (Err(routing::NoCandidate::UnknownModel), _) if cfg.awaits(&info.model) => (
            serde_json::Value::Null,
            Some("503: the model's backends have no address yet"),
        ),
        (Err(routing::NoCandidate::UnknownModel), _) => (
            serde_json::Value::Null,
            Some("404: no backend serves this model"),
        ),
        (Err(routing::NoCandidate::Unavailable), _) => (
            serde_json::Value::Null,
            Some("503: no backend of this model is in rotation"),
        ),
    };
    let candidates: Vec<serde_json::Value> =
        order.iter().flatten().map(|&i| candidate(i)).collect();
    // The model's other backends, and why they are out of rotation.
    let excluded: Vec<serde_json::Value> = snap
        .serving(&info.model)
        .unwrap_or(&[])
        .iter()
        .filter(|i| !order.as_ref().is_ok_and(|o| o.contains(i)))
        .map(|&i| {
            let h = &snap.backends[i].backend.health;
            let why = if !h.checks_up() {
                "health checks failing"
            } else if h.is_draining() {
                "draining"
            } else {
                "circuit open"
            };
            json!({"backend": snap.backends[i].backend.name, "why": why})
        })
        .collect();
    json!({
        "policy": cfg.policy.to_string(),
        "request": request,
        "choice": choice,
        "no_choice": why_none,
        "candidates": candidates,
        "excluded": excluded,
    })
}

fn ms(s: Option<f64>) -> serde_json::Value {
    s.map_or(serde_json::Value::Null, |s| {
        serde_json::json!((s * 1e5).round() / 100.0)
    })
}

/// This gateway's placement of long-lived affinity keys (see `affinity::Placer`): how many
/// it tracks as long-lived, how many it homes away from their rendezvous home, and per
/// backend the prefix tokens homed there against its budget.
pub fn placement_stats(p: &crate::routing::affinity::Placement) -> serde_json::Value {
    let homes: Vec<serde_json::Value> = p
        .homed
        .iter()
        .map(|(name, tokens, budget)| {
            serde_json::json!({"backend": name, "prefix_tokens": tokens.round(), "budget_tokens": budget.round()})
        })
        .collect();
    serde_json::json!({
        "long_lived_keys": p.long_lived,
        "moved_keys": p.moved_keys(),
        "homes": homes,
    })
}

/// The fleet as this gateway sees it: what each engine last reported, what this gateway
/// added since, and how the `vllm` policy scores each backend for a typical request.
pub fn load_stats(config: &Config, snap: &FleetSnapshot, now: Instant) -> serde_json::Value {
    use serde_json::json;
    let stale_after = config.stale_after();
    let typical = routing::Request {
        model: "",
        prompt_tokens: 500,
        max_tokens: Some(256),
        affinity: None,
    };
    let answered = metrics::sums_by(&metrics::REQUESTS, "backend");
    let failed = metrics::sums_by(&metrics::UPSTREAM_ERRORS, "backend");
    let by_class = metrics::sums_by(&metrics::REQUESTS, "status_class");
    let (mut running, mut waiting, mut in_flight, mut kv_sum, mut kv_n, mut healthy) =
        (0.0, 0.0, 0usize, 0.0, 0usize, 0usize);
    let backends: Vec<serde_json::Value> = snap
        .backends
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let st = &e.state;
            let b = &e.backend;
            let fresh = st.fresh_load(crate::fleet::fresh_since(now, stale_after));
            let load = st.load.as_ref();
            let h = &b.health;
            if h.routable() {
                healthy += 1;
            }
            if let Some(l) = fresh {
                running += l.running.unwrap_or(0.0);
                waiting += l.waiting.unwrap_or(0.0);
                if let Some(k) = l.kv_usage {
                    kv_sum += k;
                    kv_n += 1;
                }
            }
            in_flight += b.in_flight();
            let kv = fresh.and_then(|l| l.kv_usage);
            let queue_share = match (fresh, b.max_concurrent_requests) {
                (Some(l), Some(m)) => {
                    Some((l.running.unwrap_or(0.0) + l.waiting.unwrap_or(0.0)) / m as f64)
                }
                _ => None,
            };
            let utilization = match (kv, queue_share) {
                (Some(k), Some(q)) => Some(k.max(q)),
                (k, q) => k.or(q),
            };
            let hit_rate = load.and_then(|l| match (l.prefix_hits, l.prefix_queries) {
                (Some(h), Some(q)) if q > 0.0 => Some(h / q),
                _ => None,
            });
            json!({
                "name": b.name,
                "url": b.url,
                "address": b.addr.to_string(),
                "healthy": h.checks_up(),
                "routable": h.routable(),
                "health_error": h.check_error(),
                "circuit": h.breaker_state().as_str(),
                "circuit_opens_total": h.breaker_opens(),
                "last_failure": h.last_failure().map(|k| k.as_str()),
                "draining": h.is_draining(),
                "models_error": st.models_error,
                "vllm_version": st.version,
                "models": st.models,
                "running": fresh.and_then(|l| l.running),
                "waiting": fresh.and_then(|l| l.waiting),
                "kv_usage": kv,
                // LoRA adapter slots: null unless the engine reports them.
                "lora": fresh.and_then(|l| l.lora.as_ref()).map(|s| json!({
                    "max_loras": s.max,
                    "running_adapters": s.running,
                    "waiting_adapters": s.waiting,
                })),
                "in_flight": b.in_flight(),
                "requests_total": answered.get(&b.name).copied().unwrap_or(0),
                "upstream_errors_total": failed.get(&b.name).copied().unwrap_or(0),
                "dispatched_since_scrape": b.dispatched().saturating_sub(st.dispatched_at_scrape),
                "capacity": {
                    "kv_tokens": load.and_then(|l| l.kv_capacity_tokens),
                    "max_concurrent_requests": b.max_concurrent_requests,
                    // The engine's batch limit as learned; null until it has queued.
                    "max_running_learned": st.learned_max_running(),
                    "weight": b.weight,
                },
                "utilization": utilization,
                "itl_ms": ms(st.itl_s),
                "ttft_ms": ms(st.ttft_s),
                "e2e_ms": ms(st.e2e_s),
                "preemptions_total": load.and_then(|l| l.preemptions),
                "prefix_cache_hit_rate": hit_rate,
                "engines": load.map(|l| l.engines),
                "scrape_fresh": fresh.is_some(),
                "scrape_age_ms": st.load_at.map(|t| now.saturating_duration_since(t).as_millis() as u64),
                "last_scrape_error": st.scrape_error,
                "score_ms": ms(Some(routing::vllm_score(
                    snap,
                    i,
                    &typical,
                    crate::fleet::fresh_since(now, stale_after),
                ))),
            })
        })
        .collect();
    json!({
        "policy": config.policy.to_string(),
        "scrape_interval_ms": config.scrape_interval.as_millis() as u64,
        "requests": {
            "total": by_class.values().sum::<u64>(),
            "by_status_class": by_class,
        },
        "fleet": {
            "backends": snap.backends.len(),
            "healthy": healthy,
            "models": snap.healthy_models(),
            // What a request that names no model is for now, or why there is none.
            "default_model": match snap.default_model(config.default_model.as_deref()) {
                Ok(m) => json!({"model": m, "configured": config.default_model.is_some()}),
                Err(firsts) => json!({"model": null, "replicas_list_first": firsts}),
            },
            "model_aliases": &config.model_aliases,
            "running": running,
            "waiting": waiting,
            "in_flight": in_flight,
            "kv_usage_mean": if kv_n > 0 { Some(kv_sum / kv_n as f64) } else { None },
        },
        "backends": backends,
        // Entries whose host name has no address yet: nothing is sent to them.
        "awaiting_address": config
            .without_addresses()
            .map(|g| json!({"name": g.name, "host": g.resolve, "models": g.static_models}))
            .collect::<Vec<_>>(),
    })
}
