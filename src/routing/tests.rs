//! Selection's unit tests: every policy against built snapshots.

use super::affinity::AffinityKey;
use super::policy::affinity::{affinity_first, affinity_order, AFFINITY_HEADROOM};
use super::score::PREFILL_TOKENS_PER_STEP;
use super::*;
use crate::config::BackendConfig;
use crate::engine::metrics::EngineLoad;
use crate::fleet::BackendEntry;
use crate::fleet::Fleet;

const STALE: Duration = Duration::from_secs(1);

fn req() -> Request<'static> {
    Request {
        model: "m",
        prompt_tokens: 200,
        max_tokens: Some(100),
        affinity: None,
        cached: None,
    }
}

fn keyed(key: u64, reusable_bytes: usize) -> Request<'static> {
    Request {
        affinity: Some(Sticky {
            key: AffinityKey {
                key,
                source: affinity::Source::Conversation,
                reusable_bytes,
            },
            load_factor: 1.25,
            placed: None,
        }),
        ..req()
    }
}

/// Backend indices of `snap` in `key`'s rendezvous order.
fn rank_order(snap: &FleetSnapshot, key: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..snap.backends.len()).collect();
    let rank = |i: usize| {
        let b = &snap.backends[i].backend;
        affinity::rank(key, b.node_id, b.weight)
    };
    order.sort_by(|&a, &b| rank(b).total_cmp(&rank(a)));
    order
}

/// Four healthy replicas, each scraped at `now` with the same load and speed.
fn four_equal(now: Instant) -> FleetSnapshot {
    let mut snap = snapshot(&[true, true, true, true]);
    for i in 0..4 {
        snap = scraped(snap, i, 2.0, 0.0, 0.1, 0.02, now);
    }
    snap
}

#[test]
fn a_placed_key_goes_first_to_its_placement_then_in_rendezvous_order() {
    let now = Instant::now();
    let sel = Selector::new(STALE);
    let snap = four_equal(now);
    let key = 0x5eed;
    let order = rank_order(&snap, key);
    let mut req = keyed(key, 8000);
    // Not placed: its rendezvous home.
    for policy in [Policy::Vllm, Policy::Affinity] {
        let c = sel.best(policy, &snap, &req, &[], now).unwrap();
        assert_eq!(
            (c.index, c.reason),
            (order[0], Reason::AffinityHome),
            "{policy}"
        );
    }
    // Placed on its third: that one is its home now, and its old home comes next.
    let placed = order[2];
    if let Some(s) = req.affinity.as_mut() {
        s.placed = Some(snap.backends[placed].backend.node_id);
    }
    for policy in [Policy::Vllm, Policy::Affinity] {
        let c = sel.best(policy, &snap, &req, &[], now).unwrap();
        assert_eq!(
            (c.index, c.reason),
            (placed, Reason::AffinityHome),
            "{policy}"
        );
        let c = sel.best(policy, &snap, &req, &[placed], now).unwrap();
        assert_eq!(c.index, order[0], "{policy}");
    }
    let all = sel
        .candidates(Policy::Affinity, &snap, &req, &[], now)
        .unwrap();
    assert_eq!(all, vec![order[2], order[0], order[1], order[3]]);
}

#[test]
fn the_placer_moves_long_lived_keys_off_a_home_past_its_share_of_kv() {
    use crate::config::PlacementSettings;
    use crate::routing::affinity::Placer;
    let t0 = Instant::now();
    let mut snap = snapshot(&[true, true, true, true]);
    for i in 0..4 {
        // 450,000 tokens of KV each: a share of 1% is 4,500 tokens, four keys of 1,000.
        snap = scraped(snap, i, 2.0, 0.0, 0.1, 0.02, t0);
    }
    let settings = PlacementSettings {
        kv_share: 0.01,
        long_lived_after: Duration::from_secs(20),
    };
    // Twelve keys, six of them homed on one backend (room for four there).
    let (mut keys, mut on_first) = (Vec::new(), 0);
    for i in 0..1000u64 {
        let k = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let first = rank_order(&snap, k)[0] == 0;
        if (first && on_first < 6) || (!first && keys.len() - on_first < 6) {
            on_first += first as usize;
            keys.push(k);
        }
    }
    assert_eq!(keys.len(), 12);
    let bytes = 1000 * BYTES_PER_TOKEN;
    let homes = |snap: &FleetSnapshot, placer: &Placer| -> Vec<usize> {
        let p = placer.placement();
        keys.iter()
            .map(|&k| match p.moved(k) {
                Some(node) => snap
                    .pick_inputs
                    .iter()
                    .position(|x| x.node_id == node)
                    .unwrap(),
                None => rank_order(snap, k)[0],
            })
            .collect()
    };
    // Two gateways see the same keys, in other orders and at other times.
    let (a, b) = (Placer::default(), Placer::default());
    for (n, &k) in keys.iter().enumerate() {
        a.record("m", k, bytes, t0);
        b.record(
            "m",
            keys[keys.len() - 1 - n],
            bytes,
            t0 + Duration::from_secs(2),
        );
    }
    // Seen once: not long-lived, nothing placed.
    a.replan(&snap, settings, t0 + Duration::from_secs(21));
    assert_eq!(a.placement().long_lived, 0);
    for (n, &k) in keys.iter().enumerate() {
        a.record("m", k, bytes, t0 + Duration::from_secs(25 + n as u64 % 3));
        b.record("m", k, bytes, t0 + Duration::from_secs(30));
    }
    let t = t0 + Duration::from_secs(30);
    a.replan(&snap, settings, t);
    b.replan(&snap, settings, t);
    let (pa, pb) = (a.placement(), b.placement());
    assert_eq!(pa.long_lived, 12);
    let ha = homes(&snap, &a);
    assert_eq!(
        ha,
        homes(&snap, &b),
        "two gateways placed the keys differently"
    );
    let unplaced: Vec<usize> = keys.iter().map(|&k| rank_order(&snap, k)[0]).collect();
    let per = |h: &[usize]| {
        (0..4)
            .map(|i| h.iter().filter(|&&x| x == i).count())
            .collect::<Vec<_>>()
    };
    assert!(
        per(&unplaced).iter().any(|&n| n > 4),
        "the test needs an uneven split: {:?}",
        per(&unplaced)
    );
    assert!(
        per(&ha).iter().all(|&n| n <= 4),
        "{:?} -> {:?}",
        per(&unplaced),
        per(&ha)
    );
    assert!(pa.moved_keys() > 0 && pa.moved_keys() == pb.moved_keys());
    assert!(
        pa.homed.iter().all(|(_, used, budget)| used <= budget),
        "{:?}",
        pa.homed
    );
    // The plan is followed.
    let sel = Selector::new(STALE);
    for (n, &k) in keys.iter().enumerate() {
        let mut req = keyed(k, bytes);
        if let Some(s) = req.affinity.as_mut() {
            s.placed = a.moved(k);
        }
        let c = sel.best(Policy::Affinity, &snap, &req, &[], t).unwrap();
        assert_eq!(c.index, ha[n]);
    }
    // Off: nothing moves.
    let off = PlacementSettings {
        kv_share: 0.0,
        ..settings
    };
    a.replan(&snap, off, t + Duration::from_secs(2));
    assert_eq!(a.placement().moved_keys(), 0);
    // Keys idle for a minute are forgotten.
    a.replan(&snap, settings, t + Duration::from_secs(4));
    assert_eq!(a.placement().long_lived, 12);
    a.replan(
        &snap,
        settings,
        t + crate::config::defaults::AFFINITY_KEY_IDLE + Duration::from_secs(1),
    );
    assert_eq!(
        (a.placement().long_lived, a.placement().moved_keys()),
        (0, 0)
    );
}

#[test]
fn affinity_sends_a_key_home_and_spills_to_its_next_when_the_home_is_overloaded() {
    let now = Instant::now();
    let sel = Selector::new(STALE);
    let mut snap = snapshot(&[true; 4]);
    for i in 0..4 {
        snap = scraped(snap, i, 10.0, 0.0, 0.2, 0.01, now);
    }
    let mut homes = std::collections::HashSet::new();
    for key in 0..64u64 {
        let order = rank_order(&snap, key);
        for policy in [Policy::Affinity, Policy::Vllm] {
            let c = sel.best(policy, &snap, &keyed(key, 400), &[], now).unwrap();
            assert_eq!(
                (c.index, c.reason),
                (order[0], Reason::AffinityHome),
                "{policy}"
            );
        }
        homes.insert(order[0]);
        // A tried home: the next in the key's order.
        let c = sel
            .best(Policy::Affinity, &snap, &keyed(key, 400), &[order[0]], now)
            .unwrap();
        assert_eq!((c.index, c.reason), (order[1], Reason::AffinityHome));
    }
    assert_eq!(homes.len(), 4, "keys spread over every backend");

    // Overload the home of key 7: its requests go to the key's next backend (the same
    // in every gateway), not to whichever is least loaded.
    let key = 7;
    let order = rank_order(&snap, key);
    let mut busy = scraped(
        FleetSnapshot::new(snap.backends.clone()),
        order[0],
        60.0,
        20.0,
        0.6,
        0.01,
        now,
    );
    busy = scraped(busy, order[2], 2.0, 0.0, 0.1, 0.01, now);
    for policy in [Policy::Affinity, Policy::Vllm] {
        let c = sel.best(policy, &busy, &keyed(key, 400), &[], now).unwrap();
        assert_eq!(
            (c.index, c.reason),
            (order[1], Reason::AffinitySpill),
            "{policy}"
        );
    }
    // Candidates: the pick first, every other eligible backend after it.
    let all = sel
        .candidates(Policy::Affinity, &busy, &keyed(key, 400), &[], now)
        .unwrap();
    assert_eq!(all[0], order[1]);
    assert_eq!(all.len(), 4);
}

#[test]
fn a_request_sent_home_adds_only_its_uncached_prompt_to_the_pending_prefill() {
    let shared = Request {
        prompt_tokens: 1260,
        ..keyed(3, 1200 * BYTES_PER_TOKEN)
    };
    let choice = |reason| Choice {
        index: 0,
        reason,
        score_s: None,
        cached_tokens: None,
    };
    assert_eq!(shared.prefill_tokens(&choice(Reason::AffinityHome)), 60);
    assert_eq!(shared.prefill_tokens(&choice(Reason::AffinitySpill)), 1260);
    assert_eq!(shared.prefill_tokens(&choice(Reason::LowestScore)), 1260);
    let unkeyed = Request {
        prompt_tokens: 1260,
        ..req()
    };
    assert_eq!(unkeyed.prefill_tokens(&choice(Reason::AffinityHome)), 1260);
    let all_reused = Request {
        prompt_tokens: 10,
        ..keyed(3, 400)
    };
    assert_eq!(all_reused.prefill_tokens(&choice(Reason::AffinityHome)), 0);
}

/// One gateway sending a burst of requests that share a long prefix, between two
/// scrapes of equal replicas: they all stay home, because each counts only its
/// uncached part as pending prefill there (counting whole prompts pushed the later
/// ones off their home).
#[test]
fn a_burst_on_one_prefix_stays_home_under_the_vllm_policy() {
    let now = Instant::now();
    let sel = Selector::new(STALE);
    let mut snap = snapshot(&[true; 4]);
    for i in 0..4 {
        snap = scraped(snap, i, 8.0, 0.0, 0.2, 0.02, now);
    }
    let key = 21;
    let home = rank_order(&snap, key)[0];
    let r = Request {
        prompt_tokens: 1260,
        ..keyed(key, 1200 * BYTES_PER_TOKEN)
    };
    let mut guards = Vec::new();
    for n in 0..12 {
        let c = sel.best(Policy::Vllm, &snap, &r, &[], now).unwrap();
        assert_eq!(
            (c.index, c.reason),
            (home, Reason::AffinityHome),
            "request {n} of the burst"
        );
        let b = &snap.backends[c.index].backend;
        guards.push(b.begin_request_with_prefill(r.prefill_tokens(&c) as u64));
    }
}

#[test]
fn vllm_goes_home_only_when_it_is_cheap() {
    let now = Instant::now();
    let sel = Selector::new(STALE);
    let key = 11;
    let mut snap = snapshot(&[true; 3]);
    for i in 0..3 {
        snap = scraped(snap, i, 20.0, 0.0, 0.2, 0.01, now);
    }
    let home = rank_order(&snap, key)[0];
    // The home a little slower (within the load factor): still home.
    let a_bit = scraped(
        FleetSnapshot::new(snap.backends.clone()),
        home,
        20.0,
        0.0,
        0.2,
        0.011,
        now,
    );
    let c = sel
        .best(Policy::Vllm, &a_bit, &keyed(key, 4), &[], now)
        .unwrap();
    assert_eq!((c.index, c.reason), (home, Reason::AffinityHome));
    // A third slower: within the load bound (1.25 × the mean), but beyond the band
    // (1.25 × the lowest): the lowest score, unless a long reusable prefix pays for it.
    let much = scraped(
        FleetSnapshot::new(snap.backends.clone()),
        home,
        20.0,
        0.0,
        0.2,
        0.0135,
        now,
    );
    let c = sel
        .best(Policy::Vllm, &much, &keyed(key, 4), &[], now)
        .unwrap();
    assert_ne!(c.index, home);
    assert_eq!(c.reason, Reason::AffinitySpill);
    let c = sel
        .best(Policy::Vllm, &much, &keyed(key, 40_000), &[], now)
        .unwrap();
    assert_eq!((c.index, c.reason), (home, Reason::AffinityHome));
    // Without a key, or with nothing to reuse yet (a first message): the lowest
    // score, as always.
    for r in [req(), keyed(key, 0)] {
        let c = sel.best(Policy::Vllm, &a_bit, &r, &[], now).unwrap();
        assert_ne!(c.index, home);
        assert_eq!(c.reason, Reason::LowestScore);
    }
}

fn snapshot(healthy: &[bool]) -> FleetSnapshot {
    snapshot_weighted(healthy, |_| 1.0)
}

fn snapshot_weighted(healthy: &[bool], weight: impl Fn(usize) -> f64) -> FleetSnapshot {
    let cfgs: Vec<BackendConfig> = (0..healthy.len())
        .map(|i| BackendConfig {
            static_models: Some(vec!["m".into()]),
            weight: weight(i),
            ..BackendConfig::new(
                format!("b{i}"),
                format!("http://b{i}"),
                "127.0.0.1:1".parse().unwrap(),
            )
        })
        .collect();
    let fleet = Fleet::new(&cfgs);
    let entries: Vec<BackendEntry> = fleet.load().backends.clone();
    for (e, &h) in entries.iter().zip(healthy) {
        let result = if h { Ok(()) } else { Err("down".into()) };
        e.backend.health.observe_check(result, &Default::default());
    }
    FleetSnapshot::new(entries)
}

/// Sets a fresh scrape on backend `i`.
fn scraped(
    snap: FleetSnapshot,
    i: usize,
    running: f64,
    waiting: f64,
    kv: f64,
    itl: f64,
    now: Instant,
) -> FleetSnapshot {
    let mut entries = snap.backends.clone();
    let e = &mut entries[i];
    e.state.load = Some(EngineLoad {
        running: Some(running),
        waiting: Some(waiting),
        kv_usage: Some(kv),
        kv_capacity_tokens: Some(450_000),
        engines: 1,
        ..EngineLoad::default()
    });
    e.state.load_at = Some(now);
    e.state.dispatched_at_scrape = e.backend.dispatched();
    e.state.itl_s = Some(itl);
    e.state.e2e_s = Some(itl * 200.0);
    FleetSnapshot::new(entries)
}

#[test]
fn the_reason_says_why_a_backend_was_picked() {
    let now = Instant::now();
    let sel = Selector::new(STALE);
    let mut snap = snapshot(&[true, true, true]);
    snap = scraped(snap, 0, 250.0, 80.0, 0.97, 0.05, now);
    snap = scraped(snap, 1, 200.0, 40.0, 0.95, 0.05, now);
    snap = scraped(snap, 2, 0.0, 0.0, 0.0, 0.02, now - 10 * STALE);
    let reason = |snap: &FleetSnapshot, p: Policy, tried: &[usize]| {
        sel.best(p, snap, &req(), tried, now).unwrap()
    };
    let c = reason(&snap, Policy::Vllm, &[2]);
    assert_eq!((c.index, c.reason), (1, Reason::LowestScore));
    assert!(c.score_s.is_some_and(|s| s > 0.0));
    // The idle-looking backend 2 is stale: if it wins, the log must say so.
    let c = reason(&snap, Policy::Vllm, &[]);
    assert_eq!((c.index, c.reason), (2, Reason::LocalEstimate));
    assert_eq!(
        reason(&snap, Policy::Vllm, &[0, 2]).reason,
        Reason::OnlyCandidate
    );
    assert_eq!(
        reason(&snap, Policy::RoundRobin, &[]).reason,
        Reason::Rotation
    );
    assert_eq!(
        reason(&snap, Policy::LeastRequest, &[]).reason,
        Reason::FewestInFlight
    );
    assert_eq!(
        reason(&snap, Policy::PowerOfTwo, &[]).reason,
        Reason::TwoChoices
    );
    for e in &snap.backends {
        for _ in 0..3 {
            e.backend
                .health
                .record_failure(crate::fleet::health::FailureKind::Connect, 3, now);
        }
    }
    let c = reason(&snap, Policy::LeastRequest, &[]);
    assert_eq!(c.reason, Reason::OpenCircuitFallback);
    assert_eq!(c.score_s, None);
}

#[test]
fn round_robin_rotates_over_healthy_backends_per_model() {
    let snap = snapshot(&[true, false, true]);
    let sel = Selector::new(STALE);
    let now = Instant::now();
    let mut firsts = Vec::new();
    for _ in 0..4 {
        firsts.push(
            sel.candidates(Policy::RoundRobin, &snap, &req(), &[], now)
                .unwrap()[0],
        );
        let other = Request {
            model: "other",
            ..req()
        };
        let _ = sel.candidates(Policy::RoundRobin, &snap, &other, &[], now);
    }
    assert_eq!(firsts, vec![0, 2, 0, 2]);
}

#[test]
fn tried_backends_are_skipped_and_errors_are_distinct() {
    let snap = snapshot(&[true, true]);
    let sel = Selector::new(STALE);
    let now = Instant::now();
    for policy in [
        Policy::RoundRobin,
        Policy::LeastRequest,
        Policy::PowerOfTwo,
        Policy::Vllm,
    ] {
        assert_eq!(
            sel.candidates(policy, &snap, &req(), &[0], now).unwrap(),
            vec![1]
        );
        assert_eq!(
            sel.candidates(policy, &snap, &req(), &[0, 1], now),
            Err(NoCandidate::Unavailable)
        );
        let unknown = Request {
            model: "x",
            ..req()
        };
        assert_eq!(
            sel.candidates(policy, &snap, &unknown, &[], now),
            Err(NoCandidate::UnknownModel)
        );
    }
}

#[test]
fn least_request_prefers_fewest_in_flight() {
    let snap = snapshot(&[true, true, true]);
    let _a = snap.backends[0].backend.begin_request();
    let _b = snap.backends[1].backend.begin_request();
    let _c = snap.backends[1].backend.begin_request();
    let sel = Selector::new(STALE);
    let got = sel
        .candidates(Policy::LeastRequest, &snap, &req(), &[], Instant::now())
        .unwrap();
    assert_eq!(got, vec![2, 0, 1]);
}

#[test]
fn power_of_two_prefers_the_less_busy_of_its_pair() {
    let snap = snapshot(&[true, true]);
    let _g: Vec<_> = (0..5)
        .map(|_| snap.backends[0].backend.begin_request())
        .collect();
    let sel = Selector::new(STALE);
    for _ in 0..20 {
        let got = sel
            .candidates(Policy::PowerOfTwo, &snap, &req(), &[], Instant::now())
            .unwrap();
        assert_eq!(got, vec![1, 0]);
    }
}

#[test]
fn vllm_prefers_the_faster_replica_until_its_steps_grow() {
    let now = Instant::now();
    // b0: busy fast replica (ITL 15 ms at 100 running); b1: slow replica, idle-ish,
    // ITL 12 ms at 2 running.
    let snap = scraped(snapshot(&[true, true]), 0, 100.0, 0.0, 0.3, 0.015, now);
    let snap = scraped(snap, 1, 2.0, 0.0, 0.01, 0.012, now);
    let sel = Selector::new(STALE);
    assert_eq!(
        sel.candidates(Policy::Vllm, &snap, &req(), &[], now)
            .unwrap()[0],
        1
    );
    // The same slow replica at 20 running (ITL 30 ms) loses.
    let snap = scraped(snap, 1, 20.0, 0.0, 0.1, 0.030, now);
    assert_eq!(
        sel.candidates(Policy::Vllm, &snap, &req(), &[], now)
            .unwrap()[0],
        0
    );
}

/// `snap` with every backend's answers averaging `tokens` tokens (TTFT one ITL, e2e that
/// plus `tokens` − 1 ITLs).
fn answers_of(snap: FleetSnapshot, tokens: f64) -> FleetSnapshot {
    let mut entries = snap.backends.clone();
    for e in &mut entries {
        let itl = e.state.itl_s.unwrap();
        e.state.ttft_s = Some(itl);
        e.state.e2e_s = Some(itl * tokens);
    }
    FleetSnapshot::new(entries)
}

#[test]
fn in_a_fleet_of_unequal_speeds_long_answers_pay_for_a_slow_replica() {
    let now = Instant::now();
    // b0, b1: fast replicas, 4 running, ITL 12 ms; b2: a third of their speed, 1 running,
    // ITL 36 ms. Answers average 200 tokens.
    let fleet = |fast_running: f64, fast_waiting: f64| {
        let mut snap = snapshot(&[true, true, true]);
        for i in 0..2 {
            snap = scraped(snap, i, fast_running, fast_waiting, 0.1, 0.012, now);
            snap = with_cap(snap, i, 8.0);
        }
        answers_of(scraped(snap, 2, 1.0, 0.0, 0.02, 0.036, now), 200.0)
    };
    let sel = Selector::new(STALE);
    let ask = |max_tokens: Option<u64>, snap: &FleetSnapshot| {
        let r = Request {
            max_tokens,
            ..req()
        };
        sel.candidates(Policy::Vllm, snap, &r, &[], now).unwrap()[0]
    };
    let decode = |max_tokens: u64, snap: &FleetSnapshot, i: usize| {
        let r = Request {
            max_tokens: Some(max_tokens),
            ..req()
        };
        Scorer::new(snap, &r, None).terms(snap, i).decode
    };
    // With room on the fast replicas, the first token comes soonest there, whatever the
    // answer's length; answers up to the mean pay nothing anywhere.
    let room = fleet(4.0, 0.0);
    for n in [Some(2), Some(200), Some(1000), None] {
        assert_eq!(ask(n, &room), 0, "{n:?}");
    }
    for i in 0..3 {
        assert_eq!(decode(2, &room, i), 0.0);
        assert_eq!(decode(200, &room, i), 0.0);
    }
    // Fast replicas full with 1 waiting (a queue place there costs e2e / cap = 0.3 s): a
    // long answer still waits there rather than pay at b2 half of its 800 tokens beyond
    // the mean × 24 ms, capped at one place in b2's queue (7.2 s / 8).
    let full = fleet(8.0, 1.0);
    assert_eq!(ask(None, &full), 2, "the first token comes sooner at b2");
    assert_eq!(ask(Some(1000), &full), 0);
    assert!((decode(1000, &full, 2) - 0.9).abs() < 1e-9);
    assert!((decode(230, &full, 2) - 0.5 * 30.0 * 0.024).abs() < 1e-9);
    assert_eq!(decode(1000, &full, 0), 0.0);
    assert_eq!(
        ask(Some(150), &full),
        2,
        "a short answer goes where its first token is soonest"
    );
    // With a queue longer than that, it goes to the slow replica.
    assert_eq!(ask(Some(1000), &fleet(8.0, 200.0)), 2);
    // Speeds within 1.5× (equal hardware, different batches): no term.
    let mut equal = snapshot(&[true, true]);
    equal = scraped(equal, 0, 6.0, 0.0, 0.1, 0.012, now);
    equal = answers_of(scraped(equal, 1, 1.0, 0.0, 0.02, 0.016, now), 200.0);
    for (n, i) in [(2, 0), (2, 1), (1000, 0), (1000, 1)] {
        assert_eq!(decode(n, &equal, i), 0.0);
    }
}

#[test]
fn vllm_sends_a_lora_adapter_where_it_has_a_slot() {
    use crate::engine::metrics::LoraSlots;
    let now = Instant::now();
    let sel = Selector::new(STALE);
    // Backend 0 is the less busy, but its one adapter slot is held by `a`; backend 1
    // has its slot free.
    let snap = scraped(snapshot(&[true, true]), 0, 4.0, 1.0, 0.1, 0.02, now);
    let snap = scraped(snap, 1, 12.0, 0.0, 0.1, 0.02, now);
    let slots = |running: &[&str], waiting: &[&str]| LoraSlots {
        max: 1,
        running: running.iter().map(|a| a.to_string()).collect(),
        waiting: waiting.iter().map(|a| a.to_string()).collect(),
    };
    let mut entries = snap.backends.clone();
    for (e, s) in entries
        .iter_mut()
        .zip([slots(&["a"], &["b"]), slots(&[], &[])])
    {
        e.state.models = vec!["m".into(), "a".into(), "b".into()];
        let load = e.state.load.as_mut().unwrap();
        load.waiting_deferred = Some(s.waiting.len() as f64);
        load.lora = Some(s);
    }
    let snap = FleetSnapshot::new(entries);
    let first = |model: &str| {
        let r = Request { model, ..req() };
        sel.best(Policy::Vllm, &snap, &r, &[], now).unwrap().index
    };
    assert_eq!(first("b"), 1, "b would wait for a slot on backend 0");
    assert_eq!(first("a"), 0, "a holds its slot on backend 0");
    assert_eq!(first("m"), 0, "the base model needs no slot");
    let scorer = Scorer::new(
        &snap,
        &Request {
            model: "b",
            ..req()
        },
        fresh_since(now, STALE),
    );
    // Waiting for a slot costs a request's life; taking a free one, nothing while the
    // batch limit is unknown, else one queue place.
    assert!(scorer.terms(&snap, 0).lora > 0.0);
    assert_eq!(scorer.terms(&snap, 1).lora, 0.0);
    let capped = FleetSnapshot::new(snap.backends.clone());
    let capped = with_cap(with_cap(capped, 0, 32.0), 1, 32.0);
    let b = Request {
        model: "b",
        ..req()
    };
    let scorer = Scorer::new(&capped, &b, fresh_since(now, STALE));
    let (full, free) = (scorer.terms(&capped, 0).lora, scorer.terms(&capped, 1).lora);
    assert!(free > 0.0 && full > 10.0 * free, "{full} {free}");
    // A stale scrape tells nothing of the slots.
    let stale = now + 10 * STALE;
    let scorer = Scorer::new(
        &snap,
        &Request {
            model: "b",
            ..req()
        },
        fresh_since(stale, STALE),
    );
    assert_eq!(scorer.terms(&snap, 0).lora, 0.0);
}

#[test]
fn a_lora_adapter_stays_where_it_holds_a_slot_unless_that_is_a_queue_busier() {
    use crate::engine::metrics::LoraSlots;
    let now = Instant::now();
    let sel = Selector::new(STALE);
    // `x` holds a slot on backend 0, a little slower than backend 1, which has both of
    // its slots free.
    let with_slots = |snap: FleetSnapshot| {
        let mut entries = snap.backends.clone();
        for (e, running) in entries.iter_mut().zip([vec!["x".to_string()], vec![]]) {
            e.state.models = vec!["m".into(), "x".into()];
            e.state.load.as_mut().unwrap().lora = Some(LoraSlots {
                max: 2,
                running,
                waiting: vec![],
            });
        }
        FleetSnapshot::new(entries)
    };
    let x = Request {
        model: "x",
        ..req()
    };
    // Both engines learned their batch limit, 32: a free slot costs a queue place.
    let snap = scraped(snapshot(&[true, true]), 0, 4.0, 0.0, 0.1, 0.021, now);
    let snap = with_slots(scraped(snap, 1, 3.0, 0.0, 0.1, 0.020, now));
    let snap = with_cap(with_cap(snap, 0, 32.0), 1, 32.0);
    assert_eq!(
        sel.best(Policy::Vllm, &snap, &x, &[], now).unwrap().index,
        0
    );
    assert_eq!(
        sel.best(Policy::Vllm, &snap, &req(), &[], now)
            .unwrap()
            .index,
        1,
        "the base model takes the faster replica"
    );
    // Requests waiting for room there outweigh keeping the slot free.
    let snap = scraped(snapshot(&[true, true]), 0, 32.0, 3.0, 0.1, 0.021, now);
    let snap = with_slots(scraped(snap, 1, 3.0, 0.0, 0.1, 0.020, now));
    let snap = with_cap(with_cap(snap, 0, 32.0), 1, 32.0);
    assert_eq!(
        sel.best(Policy::Vllm, &snap, &x, &[], now).unwrap().index,
        1
    );
    // Without a batch limit there is no queue place to weigh a slot against.
    let snap = scraped(snapshot(&[true, true]), 0, 4.0, 0.0, 0.1, 0.021, now);
    let snap = with_slots(scraped(snap, 1, 3.0, 0.0, 0.1, 0.020, now));
    assert_eq!(
        sel.best(Policy::Vllm, &snap, &x, &[], now).unwrap().index,
        1
    );
}

#[test]
fn an_adapter_sent_since_the_scrape_holds_its_slot() {
    use crate::engine::metrics::LoraSlots;
    let now = Instant::now();
    let sel = Selector::new(STALE);
    // One free slot on each; backend 0 is the faster.
    let snap = scraped(snapshot(&[true, true]), 0, 2.0, 0.0, 0.1, 0.02, now);
    let snap = scraped(snap, 1, 2.0, 0.0, 0.1, 0.03, now);
    let mut entries = snap.backends.clone();
    for e in entries.iter_mut() {
        e.state.models = vec!["m".into(), "x".into(), "y".into()];
        e.state.load.as_mut().unwrap().lora = Some(LoraSlots {
            max: 1,
            running: vec![],
            waiting: vec!["x".into(), "y".into()],
        });
    }
    let snap = FleetSnapshot::new(entries);
    let first = |model: &str| {
        let r = Request { model, ..req() };
        sel.best(Policy::Vllm, &snap, &r, &[], now).unwrap().index
    };
    assert_eq!((first("x"), first("y")), (0, 0));
    // `x` is sent to backend 0 before the next scrape: it takes the slot there, so `y`
    // would wait on backend 0, and a second `x` joins the first.
    let b0 = snap.backends[0].backend.clone();
    let _x = b0.begin_request();
    b0.note_adapter("x");
    assert_eq!(first("y"), 1);
    assert_eq!(first("x"), 0);
    // An adapter noted before the scrape began is in the scrape's own numbers.
    let rescraped = scraped(
        FleetSnapshot::new(snap.backends.clone()),
        0,
        2.0,
        0.0,
        0.1,
        0.02,
        now,
    );
    let r = Request {
        model: "y",
        ..req()
    };
    assert_eq!(
        Scorer::new(&rescraped, &r, fresh_since(now, STALE))
            .terms(&rescraped, 0)
            .lora,
        0.0
    );
}

#[test]
fn vllm_avoids_queues_and_full_kv() {
    let now = Instant::now();
    let base = scraped(snapshot(&[true, true]), 0, 50.0, 0.0, 0.5, 0.02, now);
    let sel = Selector::new(STALE);
    let queued = scraped(base, 1, 40.0, 5.0, 0.5, 0.015, now);
    assert_eq!(
        sel.candidates(Policy::Vllm, &queued, &req(), &[], now)
            .unwrap()[0],
        0
    );
    let base = scraped(snapshot(&[true, true]), 0, 50.0, 0.0, 0.5, 0.02, now);
    let full = scraped(base, 1, 40.0, 0.0, 0.97, 0.015, now);
    assert_eq!(
        sel.candidates(Policy::Vllm, &full, &req(), &[], now)
            .unwrap()[0],
        0
    );
}

/// Sets the batch limit the scraper learned on backend `i`.
fn with_cap(snap: FleetSnapshot, i: usize, cap: f64) -> FleetSnapshot {
    let mut entries = snap.backends.clone();
    entries[i].state.max_running_seen = cap;
    entries[i].state.queued_seen = true;
    FleetSnapshot::new(entries)
}

#[test]
fn vllm_sees_a_full_batch_the_scrape_missed_and_assumes_the_fleet_s_limit() {
    let now = Instant::now();
    let sel = Selector::new(STALE);
    let pick = |snap: &FleetSnapshot| sel.best(Policy::Vllm, snap, &req(), &[], now).unwrap();
    // b0 is fast, b1 30% slower with room: both run at most 32 sequences.
    let fleet = || {
        let snap = scraped(snapshot(&[true, true]), 1, 20.0, 0.0, 0.1, 0.013, now);
        with_cap(snap, 1, 32.0)
    };

    // b0 scraped at 31 running, with `ours` requests of this gateway in flight there
    // (sent before the scrape); the guards are returned to keep them in flight.
    let b0_with = |ours: usize| {
        let snap = fleet();
        let guards: Vec<_> = (0..ours)
            .map(|_| snap.backends[0].backend.begin_request())
            .collect();
        let snap = with_cap(scraped(snap, 0, 31.0, 0.0, 0.1, 0.010, now), 0, 32.0);
        (snap, guards)
    };
    // 32 of ours, but the scrape shows 31: one was still on its way into the engine.
    // b0's batch is full: our request would queue.
    let (snap, _ours) = b0_with(32);
    assert_eq!(pick(&snap).index, 1);
    // With one request fewer of ours there, b0 has room, and its speed wins.
    let (snap, _ours) = b0_with(31);
    assert_eq!(pick(&snap).index, 0);

    // b0 never queued, so its own limit is unknown: it is assumed to be the fleet's,
    // and at 32 running it is full.
    let snap = scraped(fleet(), 0, 32.0, 0.0, 0.1, 0.010, now);
    assert_eq!(pick(&snap).index, 1);
    // With no limit known anywhere, nothing is assumed: b0 is faster.
    let mut entries = snap.backends.clone();
    entries[1].state.queued_seen = false;
    assert_eq!(pick(&FleetSnapshot::new(entries)).index, 0);
}

#[test]
fn a_short_prefill_rides_in_the_next_step() {
    let now = Instant::now();
    let snap = snapshot(&[true, true]);
    // 100 prompt tokens of ours are waiting for their first token on b0.
    let _pending = snap.backends[0].backend.begin_request_with_prefill(100);
    let mut snap = scraped(snap, 0, 10.0, 0.0, 0.1, 0.015, now);
    snap = scraped(snap, 1, 10.0, 0.0, 0.1, 0.015, now);
    let fresh = fresh_since(now, STALE);
    let with_prompt = |tokens| Request {
        prompt_tokens: tokens,
        ..req()
    };
    // 100 + 40 tokens fit in one step's worth of prefill (150): b0's first token
    // comes as soon as b1's.
    let short = with_prompt(40);
    let (s0, s1) = (
        vllm_score(&snap, 0, &short, fresh),
        vllm_score(&snap, 1, &short, fresh),
    );
    assert!((s0 - s1).abs() < 1e-12, "{s0} vs {s1}");
    // 100 + 100 do not: b0 is later by the prefill beyond one step.
    let long = with_prompt(100);
    let (s0, s1) = (
        vllm_score(&snap, 0, &long, fresh),
        vllm_score(&snap, 1, &long, fresh),
    );
    let beyond = 0.015 * (200.0 / PREFILL_TOKENS_PER_STEP - 1.0);
    assert!((s0 - s1 - beyond).abs() < 1e-9, "{s0} vs {s1}");
}

#[test]
fn stale_backends_are_never_taken_for_idle() {
    let now = Instant::now();
    let snap = scraped(snapshot(&[true, true]), 0, 10.0, 0.0, 0.2, 0.012, now);
    // b1's last scrape (idle) is old: it is scored from local accounting, with a penalty.
    let mut snap = scraped(snap, 1, 0.0, 0.0, 0.0, 0.012, now - 10 * STALE);
    let _g: Vec<_> = (0..10)
        .map(|_| snap.backends[1].backend.begin_request())
        .collect();
    snap = FleetSnapshot::new(snap.backends.clone());
    let sel = Selector::new(STALE);
    let fresh = fresh_since(now, STALE);
    assert!(vllm_score(&snap, 1, &req(), fresh) > vllm_score(&snap, 0, &req(), fresh));
    assert_eq!(
        sel.candidates(Policy::Vllm, &snap, &req(), &[], now)
            .unwrap()[0],
        0
    );
}

/// Where a burst of `k` requests between two scrapes goes under `vllm`: the first
/// candidate of each pick, counted per backend, all of them still in flight meanwhile.
fn burst(snap: &FleetSnapshot, k: usize, now: Instant) -> Vec<usize> {
    let sel = Selector::new(STALE);
    let mut guards = Vec::new();
    let mut got = vec![0usize; snap.backends.len()];
    for _ in 0..k {
        let first = sel
            .candidates(Policy::Vllm, snap, &req(), &[], now)
            .unwrap()[0];
        got[first] += 1;
        guards.push(snap.backends[first].backend.begin_request());
    }
    got
}

/// A backend whose scrape is stale, or failing from the start, must not become a sink
/// once the fresh replicas' estimates grow: its estimate grows with this gateway's
/// requests there too, so a burst spreads, with fewer on it than on a fresh one.
#[test]
fn herding_onto_a_stale_or_failing_backend_is_bounded() {
    let now = Instant::now();
    let (n, k) = (3usize, 60usize);
    for (running, never_scraped) in [(0.0, false), (0.0, true), (40.0, false), (40.0, true)] {
        let mut snap = snapshot(&vec![true; n]);
        for i in 0..n {
            let at = if i == 2 { now - 10 * STALE } else { now };
            snap = scraped(snap, i, running, 0.0, 0.1, 0.02, at);
        }
        if never_scraped {
            let mut entries = snap.backends.clone();
            entries[2].state.load = None;
            entries[2].state.load_at = None;
            entries[2].state.itl_s = None;
            entries[2].state.scrape_error = Some("line 1: not a metric name".into());
            snap = FleetSnapshot::new(entries);
        }
        let got = burst(&snap, k, now);
        let case = format!("running {running}, never scraped {never_scraped}: {got:?}");
        assert!(got[2] <= got[0].min(got[1]), "{case}");
        assert!(got[2] >= k / (2 * n), "not starved either: {case}");
    }
}

/// A backend whose `/metrics` answers without vLLM's numbers (another server, or
/// vLLM with its stats off) is fresh but knows nothing: counted from this gateway's
/// requests there, a burst still spreads.
#[test]
fn herding_is_bounded_on_backends_without_vllm_metrics() {
    let now = Instant::now();
    for (n, k) in [(3usize, 30usize), (4, 20), (2, 9)] {
        let mut entries = snapshot(&vec![true; n]).backends;
        for e in &mut entries {
            e.state.load = Some(EngineLoad::default());
            e.state.load_at = Some(now);
        }
        let got = burst(&FleetSnapshot::new(entries), k, now);
        assert!(
            got.iter().all(|&g| g <= k.div_ceil(n) + 1),
            "n={n} k={k}: {got:?}"
        );
    }
}

#[test]
fn herding_is_bounded_between_scrapes() {
    let now = Instant::now();
    for (n, k) in [(4usize, 20usize), (3, 10), (8, 100), (5, 7)] {
        let mut snap = snapshot(&vec![true; n]);
        for i in 0..n {
            snap = scraped(snap, i, 10.0, 0.0, 0.2, 0.01, now);
        }
        let got = burst(&snap, k, now);
        let bound = k.div_ceil(n) + 1;
        assert!(got.iter().all(|&g| g <= bound), "n={n} k={k}: {got:?}");
    }
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever the fleet looks like, a policy returns exactly the healthy, untried
        /// backends, each once.
        #[test]
        fn candidates_are_exactly_the_healthy_untried(
            healthy in prop::collection::vec(any::<bool>(), 1..12),
            loads in prop::collection::vec((0.0f64..300.0, 0.0f64..50.0, 0.0f64..1.0, 0.001f64..0.2, any::<bool>()), 12),
            tried_mask in prop::collection::vec(any::<bool>(), 12),
            in_flight in prop::collection::vec(0usize..20, 12),
            policy in prop::sample::select(vec![Policy::RoundRobin, Policy::LeastRequest, Policy::PowerOfTwo, Policy::Vllm, Policy::Affinity]),
            key in prop::option::of((any::<u64>(), 0usize..100_000)),
        ) {
            let now = Instant::now();
            let n = healthy.len();
            let mut snap = snapshot(&healthy);
            for (i, &(r, w, kv, itl, fresh)) in loads.iter().enumerate().take(n) {
                let at = if fresh { now } else { now - 10 * STALE };
                snap = scraped(snap, i, r, w, kv, itl, at);
            }
            let _guards: Vec<_> = (0..n)
                .flat_map(|i| (0..in_flight[i]).map(move |_| i))
                .map(|i| snap.backends[i].backend.begin_request())
                .collect();
            let tried: Vec<usize> = (0..n).filter(|&i| tried_mask[i]).collect();
            let want: Vec<usize> = (0..n).filter(|&i| healthy[i] && !tried_mask[i]).collect();
            let sel = Selector::new(STALE);
            let req = match key {
                Some((k, reusable)) => keyed(k, reusable),
                None => req(),
            };
            let best = sel.best(policy, &snap, &req, &tried, now).map(|c| c.index);
            let first = sel.best(policy, &snap, &req, &[], now).map(|_| ());
            prop_assert_eq!(availability(&snap, req.model), first, "as a first attempt");
            match sel.candidates(policy, &snap, &req, &tried, now) {
                Ok(mut got) => {
                    if matches!(policy, Policy::Vllm | Policy::LeastRequest | Policy::Affinity) {
                        prop_assert_eq!(best, Ok(got[0]), "best() is the first candidate");
                    }
                    got.sort_unstable();
                    prop_assert_eq!(got, want);
                }
                Err(e) => {
                    prop_assert!(want.is_empty());
                    prop_assert_eq!(e, NoCandidate::Unavailable);
                    prop_assert_eq!(best, Err(NoCandidate::Unavailable));
                }
            }
        }

        /// The one-pass keyed pick is the first backend that qualifies in the key's
        /// sorted order (the home when none does), as the reference definition says;
        /// and that order is the weighted rendezvous order, with equal weights too
        /// (where the ranks skip their logarithm).
        #[test]
        fn affinity_first_is_the_first_that_qualifies_in_key_order(
            n in 1usize..12,
            loads in prop::collection::vec(0.0f64..50.0, 12),
            key in any::<u64>(),
            factor in 1.0f64..3.0,
            weighted in any::<bool>(),
        ) {
            let snap = snapshot_weighted(&vec![true; n], |i| {
                if weighted { 1.0 + (i % 3) as f64 } else { 2.0 }
            });
            prop_assert_eq!(snap.equal_weights, !weighted || n < 2);
            let sticky = match keyed(key, 1000).affinity {
                Some(s) => s,
                None => unreachable!("keyed() gives a key"),
            };
            let items: Vec<(usize, f64)> = (0..n).map(|i| (i, loads[i])).collect();
            let mut sorted = items.clone();
            affinity_order(&snap, &sticky, &mut sorted);
            let order: Vec<usize> = sorted.iter().map(|x| x.0).collect();
            prop_assert_eq!(order, rank_order(&snap, key));
            let only: Vec<f64> = sorted.iter().map(|x| x.1).collect();
            let want = affinity::bounded(&only, factor, AFFINITY_HEADROOM).unwrap();
            let bound = affinity::load_bound(only.iter().copied(), factor, AFFINITY_HEADROOM).unwrap();
            let got = affinity_first(&snap, &sticky, &items, |_, l| l <= bound).unwrap();
            prop_assert_eq!(got, (sorted[want], want == 0));
            // Nothing qualifies: the home.
            let none = affinity_first(&snap, &sticky, &items, |_, _| false).unwrap();
            prop_assert_eq!(none, (sorted[0], true));
        }

        /// The keyed `vllm` pick, with its shortcut through the home, is what the
        /// definition gives: every estimate, then the first backend in the key's order
        /// within the band of the lowest (the home when none is). Fleets of mixed speed
        /// and load, some stale, some with prefill pending from this gateway.
        #[test]
        fn keyed_vllm_pick_is_the_first_within_the_band_of_the_lowest(
            n in 1usize..10,
            loads in prop::collection::vec(
                (0.0f64..64.0, 0.0f64..8.0, 0.0f64..0.98, 0.005f64..0.06, 0u64..3000, any::<bool>()),
                10,
            ),
            key in any::<u64>(),
            prompt in 1usize..4000,
            reused in 0.0f64..1.0,
            factor in 1.0f64..3.0,
        ) {
            let now = Instant::now();
            let mut snap = snapshot(&vec![true; n]);
            let mut guards = Vec::new();
            for (i, &(running, waiting, kv, itl, pending, stale)) in loads.iter().take(n).enumerate() {
                let at = if stale { now - 10 * STALE } else { now };
                snap = scraped(snap, i, running, waiting, kv, itl, at);
                guards.push(snap.backends[i].backend.begin_request_with_prefill(pending));
            }
            let reusable_bytes = ((prompt as f64 * reused) as usize).max(1) * BYTES_PER_TOKEN;
            let mut r = keyed(key, reusable_bytes);
            r.prompt_tokens = prompt;
            let sticky = r.affinity.as_mut().expect("keyed");
            sticky.load_factor = factor;
            let sticky = *sticky;

            let fresh = fresh_since(now, STALE);
            let scored: Vec<(usize, f64)> =
                (0..n).map(|i| (i, vllm_score(&snap, i, &r, fresh))).collect();
            let low = scored.iter().map(|x| x.1).fold(f64::INFINITY, f64::min);
            let gain = |i: usize| {
                snap.pick_inputs[i].itl * (reusable_bytes / BYTES_PER_TOKEN) as f64
                    / PREFILL_TOKENS_PER_STEP
            };
            let mut sorted = scored.clone();
            affinity_order(&snap, &sticky, &mut sorted);
            let want = sorted
                .iter()
                .position(|&(i, s)| s <= low * factor + gain(i))
                .unwrap_or(0);
            let got = Selector::new(STALE).best(Policy::Vllm, &snap, &r, &[], now).unwrap();
            prop_assert_eq!(got.index, sorted[want].0);
            if n > 1 {
                let reason = if want == 0 { Reason::AffinityHome } else { Reason::AffinitySpill };
                prop_assert_eq!(got.reason, reason);
            }
        }

        /// Equal replicas under any load: a burst of k picks between two scrapes puts at
        /// most ceil(k/n)+1 on any one.
        #[test]
        fn herding_bound_holds_for_any_equal_load(
            n in 2usize..10, k in 1usize..200,
            running in 0.0f64..300.0, waiting in 0.0f64..20.0, kv in 0.0f64..0.98, itl in 0.001f64..0.2,
        ) {
            let now = Instant::now();
            let mut snap = snapshot(&vec![true; n]);
            for i in 0..n {
                snap = scraped(snap, i, running, waiting, kv, itl, now);
            }
            let got = burst(&snap, k, now);
            prop_assert!(got.iter().all(|&g| g <= k.div_ceil(n) + 1), "{:?}", got);
        }
    }
}

/// On KV events the prompt goes where it is cached, even to the last replica of its key's
/// order; with one candidate not known exactly, the pick is the approximate one, whatever
/// the others' events say.
#[test]
fn a_pick_on_kv_events_needs_every_candidate_known_else_it_is_the_approximate_one() {
    use super::prefix::CachedPrefix;
    let now = Instant::now();
    let sel = Selector::new(STALE);
    let snap = four_equal(now);
    let key = 0x5eed;
    let order = rank_order(&snap, key);
    let base = Request {
        prompt_tokens: 4000,
        ..keyed(key, 8000)
    };
    let approx = sel.best(Policy::Vllm, &snap, &base, &[], now).unwrap();
    assert_eq!(
        (approx.index, approx.reason),
        (order[0], Reason::AffinityHome)
    );
    let far = order[3];
    let mut all = vec![Some(0); 4];
    all[far] = Some(3968);
    let exact = CachedPrefix::new(all.clone());
    let on_events = Request {
        cached: Some(&exact),
        ..base
    };
    let c = sel.best(Policy::Vllm, &snap, &on_events, &[], now).unwrap();
    assert_eq!(
        (c.index, c.reason, c.cached_tokens),
        (far, Reason::CachedPrefix, Some(3968))
    );
    assert_eq!(
        on_events.prefill_tokens(&c),
        32,
        "only the uncached rest is pending"
    );
    for unknown in 0..4 {
        let mut some = all.clone();
        some[unknown] = None;
        let partial = CachedPrefix::new(some);
        let req = Request {
            cached: Some(&partial),
            ..base
        };
        let c = sel.best(Policy::Vllm, &snap, &req, &[], now).unwrap();
        assert_eq!(
            (c.index, c.reason, c.cached_tokens),
            (approx.index, approx.reason, None)
        );
    }
}
