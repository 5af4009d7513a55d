//! Generation: a chat, completion or audio request read, checked as vLLM checks it, run on
//! the engine, and answered whole or as vLLM's event stream.

use bytes::Bytes;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

use super::engine::Event;
use super::http::{Reply, Request, StreamItem};
use super::text::{chat_prompt, digest, tokenize, WORDS};
use super::{now_micros, now_unix, vllm_error, Faults, Sim, DIGESTS_KEPT};

#[derive(Clone, Copy)]
pub(super) enum Kind {
    Chat,
    Completion,
    /// `/v1/audio/transcriptions`: a form with an audio file.
    Transcription,
    /// `/v1/audio/translations`: the same, into English.
    Translation,
}

/// Bytes of audio per second the simulator assumes (16 kHz, 16-bit mono PCM).
const AUDIO_BYTES_PER_SECOND: usize = 32_000;
/// Encoder positions per second of audio (Whisper: 1,500 per 30 s window).
const AUDIO_TOKENS_PER_SECOND: usize = 50;

/// What a generation request asks for, read from its JSON body or form.
pub(super) struct Job {
    model: String,
    prompt_ids: Vec<u32>,
    max_tokens: Option<usize>,
    stream: bool,
    include_usage: bool,
    ignore_eos: bool,
    /// Seconds of audio (the audio endpoints' usage).
    audio_seconds: usize,
}

/// A generation request accepted: what it asks, and how it will run.
struct Plan {
    job: Job,
    prompt_tokens: usize,
    /// The output length it would reach if nothing capped it.
    natural: usize,
    /// The output length it will get.
    output_tokens: usize,
    /// vLLM's id of its answer.
    id: String,
}

impl Sim {
    pub(super) async fn generate(&self, req: &Request, kind: Kind) -> Reply {
        let arrival = Instant::now();
        let body_digest = self.note_arrival(req);
        let faults = self.faults();
        if faults.reset {
            return Reply::Reset;
        }
        if faults.stall {
            return Reply::Stall;
        }
        if let Some(status) = faults.http_error {
            return vllm_error(status, "InternalServerError", "Injected fault.", None);
        }
        let plan = match self.plan(req, kind) {
            Ok(p) => p,
            Err(reply) => return reply,
        };
        // Tokenization and validation take time in vLLM too, before the engine sees it.
        let api = self.engine.cfg.scheduler.perf.api_overhead_ms * self.engine.cfg.time_scale;
        tokio::time::sleep(Duration::from_secs_f64(api / 1000.0)).await;
        let lora = self.lora_id(&plan.job.model);
        let events = self
            .engine
            .submit(plan.job.prompt_ids, plan.output_tokens, lora, arrival);
        let ctx = GenCtx {
            id: plan.id,
            model: plan.job.model,
            created: now_unix(),
            prompt_tokens: plan.prompt_tokens,
            annotate: self.args.annotate_timing,
            kind,
            natural: plan.natural,
        };
        let headers = self.replica_headers(&body_digest);
        if plan.job.stream {
            let (tx, rx) = mpsc::channel(16);
            tokio::spawn(stream_events(
                ctx,
                events,
                tx,
                plan.job.include_usage,
                faults,
            ));
            return Reply::Stream {
                status: 200,
                content_type: "text/event-stream; charset=utf-8",
                headers,
                rx,
            };
        }
        let body = whole_answer(&ctx, events, plan.job.audio_seconds).await;
        if faults.body_cut {
            return Reply::Cut {
                status: 200,
                content_type: "application/json",
                headers,
                body,
            };
        }
        Reply::Full {
            status: 200,
            content_type: "application/json",
            headers,
            body,
        }
    }

    /// Counts a generation request and keeps what tests read of it (`/sim/state`): its
    /// body's digest (returned), its `x-forwarded-for` and `traceparent`.
    fn note_arrival(&self, req: &Request) -> String {
        let body_digest = digest(&req.body);
        {
            let mut d = self.digests.lock();
            if d.len() == DIGESTS_KEPT {
                d.pop_front();
            }
            d.push_back(body_digest.clone());
        }
        *self.forwarded_for.lock() = req.header("x-forwarded-for").map(str::to_string);
        *self.traceparent.lock() = req.header("traceparent").map(str::to_string);
        self.requests.fetch_add(1, Ordering::Relaxed);
        body_digest
    }

    /// What a generation request will do, or vLLM's answer refusing it: the model must be
    /// served, the prompt must fit the context, `max_tokens` must not exceed it (and is
    /// clamped to what the context has room for, as vLLM does).
    fn plan(&self, req: &Request, kind: Kind) -> Result<Plan, Reply> {
        let mut job = match kind {
            Kind::Chat | Kind::Completion => self.json_job(req, kind)?,
            Kind::Transcription | Kind::Translation => self.form_job(req)?,
        };
        let model = &job.model;
        if !self.serves(model) {
            return Err(vllm_error(
                404,
                "NotFoundError",
                &format!(
                    "The model `{model}` does not exist. Valid aliases: {}.",
                    self.args.models.join(", ")
                ),
                Some("model"),
            ));
        }
        if job.prompt_ids.is_empty() {
            job.prompt_ids.push(0);
        }
        let prompt_tokens = job.prompt_ids.len();
        let max_len = self.engine.cfg.scheduler.effective_max_model_len();
        if prompt_tokens >= max_len {
            return Err(vllm_error(
                400,
                "BadRequestError",
                &format!(
                    "This model's maximum context length is {max_len} tokens. However, your \
                     prompt contains at least {} input tokens, which exceeds this limit even \
                     without any output tokens. Please reduce the length of the input prompt. \
                     (parameter=input_tokens, value={})",
                    prompt_tokens, prompt_tokens
                ),
                Some("input_tokens"),
            ));
        }
        if let Some(m) = job.max_tokens.filter(|&m| m > max_len) {
            return Err(vllm_error(
                400,
                "BadRequestError",
                &format!(
                    "max_tokens={m} cannot be greater than max_model_len={max_len}. Please \
                     request fewer output tokens. (parameter=max_tokens, value={m})"
                ),
                Some("max_tokens"),
            ));
        }
        let cap = job
            .max_tokens
            .unwrap_or(max_len)
            .min(max_len - prompt_tokens)
            .max(1);
        let forced = req
            .header("x-sim-output-tokens")
            .and_then(|s| s.parse::<usize>().ok());
        let natural = match forced {
            Some(n) => n.max(1),
            None if job.ignore_eos => usize::MAX,
            None => self.sample_output_len(),
        };
        // As vLLM does, the client's `X-Request-Id` becomes the base of the request's id.
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let base = req
            .header("x-request-id")
            .map_or_else(|| format!("sim{n:012x}"), str::to_string);
        let id = match kind {
            Kind::Chat => format!("chatcmpl-{base}"),
            Kind::Completion => format!("cmpl-{base}"),
            Kind::Transcription => format!("trsc-{base}"),
            Kind::Translation => format!("trsl-{base}"),
        };
        Ok(Plan {
            job,
            prompt_tokens,
            natural,
            output_tokens: natural.min(cap),
            id,
        })
    }

    /// A chat or completion request's JSON body.
    fn json_job(&self, req: &Request, kind: Kind) -> Result<Job, Reply> {
        let v: Value = match serde_json::from_slice(&req.body) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                return Err(vllm_error(
                    400,
                    "Bad Request",
                    "JSON decode error",
                    Some("body"),
                ))
            }
        };
        let prompt = match kind {
            Kind::Chat => match v["messages"].as_array() {
                Some(m) => chat_prompt(m),
                None => {
                    return Err(vllm_error(
                        400,
                        "Bad Request",
                        "Field required",
                        Some("body.messages"),
                    ))
                }
            },
            _ => match &v["prompt"] {
                Value::String(s) => s.clone(),
                Value::Array(a) => a
                    .iter()
                    .filter_map(|p| p.as_str())
                    .collect::<Vec<_>>()
                    .join(""),
                _ => {
                    return Err(vllm_error(
                        400,
                        "Bad Request",
                        "Field required",
                        Some("body.prompt"),
                    ))
                }
            },
        };
        // With the model's own tokenizer, the engine's token ids (a shape it cannot
        // reproduce falls back to the word tokenizer).
        let own = self.tokenizer.as_ref().and_then(|t| {
            let p = match kind {
                Kind::Chat => crate::tokenize::Prompt::Chat(&v["messages"]),
                _ => crate::tokenize::Prompt::Completion(&v["prompt"]),
            };
            t.tokens(p).ok()
        });
        Ok(Job {
            model: self.named_or_first(v["model"].as_str()),
            prompt_ids: own.unwrap_or_else(|| tokenize(&prompt)),
            max_tokens: v["max_completion_tokens"]
                .as_u64()
                .or(v["max_tokens"].as_u64())
                .map(|n| n as usize),
            stream: v["stream"].as_bool().unwrap_or(false),
            include_usage: v["stream_options"]["include_usage"]
                .as_bool()
                .unwrap_or(false),
            ignore_eos: v["ignore_eos"].as_bool().unwrap_or(false),
            audio_seconds: 0,
        })
    }

    /// An audio request's `multipart/form-data` body: the audio file becomes encoder
    /// positions (50 per second of sound, at 16 kHz 16-bit), the text `prompt` tokens.
    fn form_job(&self, req: &Request) -> Result<Job, Reply> {
        let bad = |msg: &str, param: &str| vllm_error(400, "BadRequestError", msg, Some(param));
        let boundary = match req
            .header("content-type")
            .map(|c| crate::openai::form::boundary(c.as_bytes()))
        {
            Some(Some(Ok(b))) => b.into_owned(),
            _ => return Err(bad("Expected a multipart/form-data body.", "body")),
        };
        let parts = crate::openai::form::parts(&req.body, &boundary).map_err(|why| {
            bad(
                &format!("There was an error parsing the body: {why}"),
                "body",
            )
        })?;
        let field = |name: &str| {
            crate::openai::form::field(&parts, name)
                .map(|v| String::from_utf8_lossy(v).into_owned())
        };
        let flag = |name: &str| {
            crate::openai::form::field(&parts, name).and_then(crate::openai::form::boolean)
                == Some(true)
        };
        let Some(audio) = parts
            .iter()
            .find(|p| p.is_file && p.name.as_deref() == Some("file"))
        else {
            return Err(bad("Field required", "body.file"));
        };
        if audio.data.is_empty() {
            return Err(bad("The audio file is empty.", "file"));
        }
        let stream = flag("stream");
        if flag("stream_include_usage") && !stream {
            return Err(bad(
                "Stream options can only be defined when `stream=True`.",
                "stream_include_usage",
            ));
        }
        let seconds = audio.data.len().div_ceil(AUDIO_BYTES_PER_SECOND);
        let mut prompt_ids = vec![0; seconds * AUDIO_TOKENS_PER_SECOND];
        prompt_ids.extend(tokenize(&field("prompt").unwrap_or_default()));
        Ok(Job {
            model: self.named_or_first(field("model").as_deref()),
            prompt_ids,
            max_tokens: field("max_completion_tokens").and_then(|v| v.trim().parse().ok()),
            stream,
            include_usage: flag("stream_include_usage"),
            ignore_eos: false,
            audio_seconds: seconds,
        })
    }
}

/// A non-streaming answer: the engine's tokens gathered, in vLLM's JSON for its kind.
async fn whole_answer(
    ctx: &GenCtx,
    mut events: mpsc::UnboundedReceiver<Event>,
    audio_seconds: usize,
) -> Bytes {
    let mut text = String::new();
    let mut produced = 0;
    let mut reason = "length";
    while let Some(ev) = events.recv().await {
        match ev {
            Event::Token(i) => {
                text.push_str(WORDS[i % WORDS.len()]);
                produced += 1;
            }
            Event::Finished(r) => reason = finish_reason(r, produced, ctx.natural),
        }
    }
    let prompt_tokens = ctx.prompt_tokens;
    let usage = json!({"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + produced,
                       "completion_tokens": produced, "prompt_tokens_details": null});
    let body = match ctx.kind {
        Kind::Chat => json!({
            "id": ctx.id, "object": "chat.completion", "created": ctx.created, "model": ctx.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text,
                         "refusal": null, "tool_calls": [], "reasoning": null},
                         "logprobs": null, "finish_reason": reason, "stop_reason": null}],
            "system_fingerprint": "vllm-0.32.0-sim", "usage": usage,
            "prompt_logprobs": null, "kv_transfer_params": null,
        }),
        Kind::Completion => json!({
            "id": ctx.id, "object": "text_completion", "created": ctx.created, "model": ctx.model,
            "choices": [{"index": 0, "text": text, "logprobs": null,
                         "finish_reason": reason, "stop_reason": null}],
            "system_fingerprint": "vllm-0.32.0-sim", "usage": usage,
        }),
        Kind::Transcription => json!({
            "text": text, "usage": {"type": "duration", "seconds": audio_seconds},
        }),
        Kind::Translation => json!({"text": text}),
    };
    Bytes::from(body.to_string())
}

fn finish_reason(engine: &'static str, produced: usize, natural: usize) -> &'static str {
    if engine == "length" || produced < natural {
        "length"
    } else {
        "stop"
    }
}

struct GenCtx {
    id: String,
    model: String,
    created: u64,
    prompt_tokens: usize,
    annotate: bool,
    kind: Kind,
    /// The output length the request would reach if nothing capped it.
    natural: usize,
}

impl GenCtx {
    fn event(&self, mut v: Value) -> StreamItem {
        if self.annotate {
            v["sim_emitted_us"] = json!(now_micros() as u64);
        }
        StreamItem::Data(Bytes::from(format!("data: {v}\n\n")))
    }

    fn object(&self) -> &'static str {
        match self.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
            Kind::Transcription => "transcription.chunk",
            Kind::Translation => "translation.chunk",
        }
    }

    fn chunk(&self, choice: Value) -> Value {
        json!({"id": self.id, "object": self.object(), "created": self.created,
               "model": self.model, "choices": [choice]})
    }
}

/// Turns engine events into vLLM's SSE chunks: the role chunk with the first token (chat),
/// one chunk per token, `finish_reason` on the last, the optional usage chunk, `[DONE]`.
async fn stream_events(
    ctx: GenCtx,
    mut events: mpsc::UnboundedReceiver<Event>,
    tx: mpsc::Sender<StreamItem>,
    include_usage: bool,
    faults: Faults,
) {
    let mut produced = 0usize;
    let mut pending: Option<usize> = None;
    if faults.stream_hang_after_tokens == Some(0) {
        // The header is out; the engine never produces a token (a hung engine core).
        let _ = tx.send(StreamItem::Hang).await;
        return;
    }
    // A token's chunk is sent when the next event arrives, so the last one can carry
    // `finish_reason` as vLLM's does.
    loop {
        // A client that leaves must abort the request at once, not at the next token.
        let ev = tokio::select! {
            ev = events.recv() => ev,
            _ = tx.closed() => return,
        };
        if let Some(i) = pending.take() {
            let last = !matches!(ev, Some(Event::Token(_)));
            let reason = match ev {
                Some(Event::Finished(r)) => json!(finish_reason(r, produced + 1, ctx.natural)),
                None => json!("length"),
                Some(Event::Token(_)) => Value::Null,
            };
            if i == 0 {
                if let Kind::Chat = ctx.kind {
                    let role = ctx.chunk(
                        json!({"index": 0, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": null, "finish_reason": null}),
                    );
                    if tx.send(ctx.event(role)).await.is_err() {
                        return;
                    }
                }
            }
            let word = WORDS[i % WORDS.len()];
            let reason = if last { reason } else { Value::Null };
            let choice = match ctx.kind {
                Kind::Chat => json!({"index": 0, "delta": {"content": word}, "logprobs": null,
                                     "finish_reason": reason}),
                Kind::Completion => json!({"index": 0, "text": word, "logprobs": null,
                                           "finish_reason": reason, "stop_reason": null}),
                Kind::Transcription | Kind::Translation => json!({"delta": {"content": word},
                                           "finish_reason": reason, "stop_reason": null}),
            };
            if tx.send(ctx.event(ctx.chunk(choice))).await.is_err() {
                return;
            }
            produced += 1;
            if faults.stream_reset_after_tokens == Some(produced) {
                let _ = tx.send(StreamItem::Reset).await;
                return;
            }
            if faults.stream_hang_after_tokens == Some(produced) {
                let _ = tx.send(StreamItem::Hang).await;
                return;
            }
            if faults.stream_error_after_tokens == Some(produced) {
                let err = json!({"error": {"message": "EngineCore encountered an issue. See stack trace (above) for the root cause.",
                                           "type": "InternalServerError", "param": null, "code": 500}});
                let _ = tx.send(ctx.event(err)).await;
                let _ = tx
                    .send(StreamItem::Data(Bytes::from_static(b"data: [DONE]\n\n")))
                    .await;
                return;
            }
        }
        match ev {
            Some(Event::Token(i)) => pending = Some(i),
            Some(Event::Finished(_)) | None => break,
        }
    }
    if include_usage {
        let usage = json!({"id": ctx.id, "object": ctx.object(), "created": ctx.created,
            "model": ctx.model, "choices": [],
            "usage": {"prompt_tokens": ctx.prompt_tokens, "total_tokens": ctx.prompt_tokens + produced,
                      "completion_tokens": produced}});
        if tx.send(ctx.event(usage)).await.is_err() {
            return;
        }
    }
    let _ = tx
        .send(StreamItem::Data(Bytes::from_static(b"data: [DONE]\n\n")))
        .await;
}
