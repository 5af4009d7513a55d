//! Prefix affinity end to end: gateways that share nothing but their config send a
//! conversation to the same replica, every turn; removing a replica moves only its
//! conversations.

use crate::support::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;
use vllm_edge::sim::SimHandle;

/// A system prompt of about 2 KB (500 tokens), as agents and assistants send: a prefix
/// worth keeping in one replica's cache. (A prefix of a few tokens is not: the `vllm`
/// policy then routes by load alone when another replica looks a quarter faster.)
fn system_prompt() -> String {
    "You are a careful assistant. Answer in one short sentence, cite nothing, and say so \
     when you do not know. "
        .repeat(18)
}

/// Sends one turn of conversation `c` (its earlier turns in `history`) and returns the
/// backend that served it and the reply, which becomes part of the history.
async fn turn(gw: &Gateway, history: &mut Vec<Value>, question: &str) -> String {
    history.push(json!({"role": "user", "content": question}));
    let resp = http1()
        .post(gw.url("/v1/chat/completions"))
        .json(&json!({"model": "m", "max_tokens": 8, "messages": history}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let backend = resp.headers()["x-vllm-edge-backend"]
        .to_str()
        .unwrap()
        .to_string();
    let body: Value = resp.json().await.unwrap();
    history.push(json!({"role": "assistant",
                        "content": body["choices"][0]["message"]["content"].clone()}));
    backend
}

/// A conversation's opening: the system prompt every conversation shares.
fn opening() -> Vec<Value> {
    vec![json!({"role": "system", "content": system_prompt()})]
}

/// `n` equal replicas. For the `vllm` policy, at the speed of an H100 (`time_scale` 1):
/// steps of about a millisecond, long enough that the engines' measured speeds are not
/// scheduling noise (100× faster, as in other tests, a step is tens of microseconds, and
/// two idle replicas can look twice as fast as each other).
async fn fleet(n: usize, time_scale: f64) -> Vec<SimHandle> {
    let mut sims = Vec::new();
    for _ in 0..n {
        sims.push(sim_with(&["m"], |a| a.time_scale = Some(time_scale)).await);
    }
    sims
}

#[tokio::test]
async fn two_gateways_send_every_turn_of_a_conversation_to_the_same_replica() {
    let sims = fleet(4, 1.0).await;
    let refs: Vec<&SimHandle> = sims.iter().collect();
    // Two independent gateway processes with the same config (the default policy,
    // `vllm`, with affinity on by default).
    let a = Gateway::builder(&refs).start().await;
    let b = Gateway::builder(&refs).start().await;

    let conversations = 24;
    let mut served: Vec<String> = Vec::new();
    for c in 0..conversations {
        let mut history = opening();
        // Turns alternate between the two gateways.
        let first = turn(
            &a,
            &mut history,
            &format!("conversation {c}: what is a prime?"),
        )
        .await;
        let second = turn(&b, &mut history, "and the next one after that?").await;
        let third = turn(&a, &mut history, "why is that?").await;
        let fourth = turn(&b, &mut history, "thanks, one more?").await;
        assert_eq!(
            [&second, &third, &fourth],
            [&first; 3],
            "conversation {c} moved between replicas\n{}\n{}",
            a.log()
                .lines()
                .filter(|l| l.contains("access"))
                .collect::<Vec<_>>()
                .join("\n"),
            b.log()
                .lines()
                .filter(|l| l.contains("access"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        served.push(first);
    }
    let mut per_backend: HashMap<&str, usize> = HashMap::new();
    for s in &served {
        *per_backend.entry(s).or_default() += 1;
    }
    eprintln!("conversations per replica: {per_backend:?}");
    assert!(
        per_backend.len() >= 3,
        "{conversations} conversations should spread over the replicas: {per_backend:?}"
    );
    // The access log says why.
    let text = a.metrics_text().await;
    assert!(
        text.lines().any(|l| l
            .starts_with("vllm_edge_selections_total{policy=\"vllm\",reason=\"affinity_home\"}")),
        "{text}"
    );
}

#[tokio::test]
async fn removing_a_replica_moves_only_its_conversations() {
    let sims = fleet(4, 0.01).await;
    let refs: Vec<&SimHandle> = sims.iter().collect();
    // `policy: affinity` and a gateway that lacks the 4th replica: the key of every
    // conversation is looked up on both.
    let all = Gateway::builder(&refs)
        .yaml("routing:\n  policy: affinity")
        .start()
        .await;
    let fewer = Gateway::builder(&refs[..3])
        .yaml("routing:\n  policy: affinity")
        .start()
        .await;
    let removed = name_of(&sims[3]);

    let n = 200;
    let (mut on_removed, mut moved) = (0, 0);
    for c in 0..n {
        let question = format!("conversation {c}: tell me about the number {c}");
        let before = turn(&all, &mut opening(), &question).await;
        let after = turn(&fewer, &mut opening(), &question).await;
        if before == removed {
            on_removed += 1;
            assert_ne!(after, removed);
        } else {
            assert_eq!(after, before, "conversation {c} moved without cause");
        }
        if after != before {
            moved += 1;
        }
    }
    eprintln!(
        "removing 1 of 4 replicas moved {moved} of {n} conversations ({:.1}%), all of them from it",
        100.0 * moved as f64 / n as f64
    );
    assert_eq!(moved, on_removed);
    // Its fair share, give or take: a quarter of 200 is 50.
    assert!((30..=70).contains(&moved), "{moved}");
}

#[tokio::test]
async fn an_unavailable_home_sends_its_conversations_to_the_same_next_replica_everywhere() {
    let sims = fleet(4, 1.0).await;
    let refs: Vec<&SimHandle> = sims.iter().collect();
    let a = Gateway::builder(&refs).start().await;
    let b = Gateway::builder(&refs).start().await;
    // Find the conversations whose home is replica 0, then stop it.
    let home = name_of(&sims[0]);
    let mut theirs = Vec::new();
    for c in 0..40 {
        let question = format!("conversation {c}: which way is north?");
        if turn(&a, &mut opening(), &question).await == home {
            theirs.push(question);
        }
    }
    assert!(
        !theirs.is_empty(),
        "no conversation had replica 0 as its home"
    );
    sims[0].stop();
    for question in &theirs {
        let on_a = turn(&a, &mut opening(), question).await;
        let on_b = turn(&b, &mut opening(), question).await;
        assert_ne!(on_a, home);
        assert_eq!(on_a, on_b, "the gateways disagree on the next replica");
    }
}

#[tokio::test]
async fn gateways_place_long_lived_prompts_alike_and_within_each_home_s_share_of_kv() {
    use vllm_edge::routing::affinity;
    // 20,000 tokens of KV each, of which 5% (1,000 tokens) may hold long-lived prefixes:
    // three 300-token system prompts.
    let mut sims = Vec::new();
    for _ in 0..4 {
        sims.push(
            sim_with(&["m"], |a| {
                a.kv_tokens = Some(20_000);
                a.max_model_len = Some(8192);
            })
            .await,
        );
    }
    let refs: Vec<&SimHandle> = sims.iter().collect();
    let names: Vec<String> = sims.iter().map(name_of).collect();
    let body = |system: &str| {
        json!({"model": "m", "max_tokens": 4, "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": "go"}]})
    };
    // Nine prompts of 1,200 bytes, five of them homed (by rendezvous) on one replica: more
    // than its share holds.
    let home_of = |system: &str| {
        let b = serde_json::to_vec(&body(system)).unwrap();
        let info = vllm_edge::openai::inspect(&b, 64).unwrap();
        let key = affinity::key_of(&b, &info.spans, None, 4096).unwrap();
        (0..names.len())
            .max_by(|&x, &y| {
                let r = |i: usize| {
                    affinity::unweighted_rank(key.key, vllm_edge::fleet::node_id(&names[i]))
                };
                r(x).total_cmp(&r(y))
            })
            .unwrap()
    };
    let (mut prompts, mut on_first) = (Vec::new(), 0);
    for p in 0..400 {
        let system =
            format!("{p:04} {}", "you are a helpful assistant. ".repeat(43))[..1200].to_string();
        let first = home_of(&system) == 0;
        if (first && on_first < 5) || (!first && prompts.len() - on_first < 4) {
            on_first += first as usize;
            prompts.push(system);
        }
    }
    assert_eq!(prompts.len(), 9);

    let yaml =
        "routing:\n  policy: affinity\n  affinity:\n    kv_share: 0.05\n    long_lived_after: 0s";
    let a = Gateway::builder(&refs).yaml(yaml).start().await;
    let b = Gateway::builder(&refs).yaml(yaml).start().await;
    let ask = |gw: &Gateway, system: &str| {
        let req = http1()
            .post(gw.url("/v1/chat/completions"))
            .json(&body(system));
        async move {
            let resp = req.send().await.unwrap();
            assert_eq!(resp.status(), 200);
            resp.headers()["x-vllm-edge-backend"]
                .to_str()
                .unwrap()
                .to_string()
        }
    };
    // Each gateway sees the prompts once, in its own order; then plans.
    for p in &prompts {
        ask(&a, p).await;
    }
    for p in prompts.iter().rev() {
        ask(&b, p).await;
    }
    for gw in [&a, &b] {
        let planned = eventually(Duration::from_secs(10), || async {
            let v = get_json(gw.admin_url("/load-stats")).await;
            v["affinity_placement"]["long_lived_keys"] == 9
                && v["affinity_placement"]["moved_keys"].as_u64() > Some(0)
        })
        .await;
        assert!(
            planned,
            "{}",
            get_json(gw.admin_url("/load-stats")).await["affinity_placement"]
        );
    }
    let mut per_backend: HashMap<String, usize> = HashMap::new();
    for p in &prompts {
        let (on_a, on_b) = (ask(&a, p).await, ask(&b, p).await);
        assert_eq!(on_a, on_b, "the gateways placed a prompt differently");
        *per_backend.entry(on_a).or_default() += 1;
    }
    assert!(
        per_backend.values().all(|&n| n <= 3),
        "a replica is home to more prompts than its share holds: {per_backend:?}"
    );
    let text = a.metrics_text().await;
    assert!(
        text.lines()
            .any(|l| l.starts_with("vllm_edge_affinity_keys{state=\"long_lived\"} 9")),
        "{text}"
    );
    let stats = get_json(a.admin_url("/load-stats")).await["affinity_placement"].clone();
    for h in stats["homes"].as_array().unwrap() {
        assert!(
            h["prefix_tokens"].as_f64() <= h["budget_tokens"].as_f64(),
            "{stats}"
        );
    }
}
