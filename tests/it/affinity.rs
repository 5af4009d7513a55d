//! Prefix affinity end to end: gateways that share nothing but their config send a
//! conversation to the same replica, every turn; removing a replica moves only its
//! conversations.

use crate::support::*;
use serde_json::{json, Value};
use std::collections::HashMap;
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
