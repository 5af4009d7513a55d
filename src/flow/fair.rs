//! The order in which queued requests get a free slot: strict priority between classes,
//! weighted fair queueing between keys within a class. Pure: no clock, no I/O.
//!
//! Each key's requests in a class form a flow. A request joining a flow is tagged with a
//! virtual finish time, `max(class clock, the flow's last tag) + UNIT / weight`, and the
//! request with the smallest tag is served next, its tag becoming the class clock. A key
//! that sends ten times as much as another gets the same share of the slots at equal
//! weight (its tags run ten times ahead), and a key that was idle starts at the clock:
//! it earns no credit for its silence. The cost of a request is one slot, whatever its
//! length: shares are in requests.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::auth::{Priority, MAX_WEIGHT};

/// A request's cost in virtual time at weight 1; `UNIT / MAX_WEIGHT` stays above 1000.
const UNIT: u64 = 1 << 20;
const _: () = assert!(UNIT / MAX_WEIGHT as u64 >= 1000);

/// Where a queued request is, to take it out again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    pub id: u64,
    pub class: Priority,
}

#[derive(Debug)]
struct Entry<T> {
    id: u64,
    tag: u64,
    item: T,
}

#[derive(Debug)]
struct Flow<T> {
    key: Arc<str>,
    weight: u32,
    /// The tag of the flow's last request.
    finish: u64,
    items: VecDeque<Entry<T>>,
}

#[derive(Debug)]
struct Class<T> {
    clock: u64,
    /// Flows with requests, or whose last tag is still ahead of the clock. Few: one per
    /// key waiting for this model.
    flows: Vec<Flow<T>>,
}

impl<T> Default for Class<T> {
    fn default() -> Self {
        Class {
            clock: 0,
            flows: Vec::new(),
        }
    }
}

/// Requests waiting for one model.
#[derive(Debug)]
pub struct FairQueue<T> {
    classes: [Class<T>; 3],
    len: usize,
    next_id: u64,
}

impl<T> Default for FairQueue<T> {
    fn default() -> Self {
        FairQueue {
            classes: Default::default(),
            len: 0,
            next_id: 0,
        }
    }
}

/// A key's requests in the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLoad {
    pub key: Arc<str>,
    pub queued: usize,
    pub weight: u32,
}

impl<T> FairQueue<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queues `item` for `key` (at `weight`, which also becomes the flow's weight from
    /// now on: a reload may change it) in `class`.
    pub fn push(&mut self, class: Priority, key: &Arc<str>, weight: u32, item: T) -> Ticket {
        let weight = weight.clamp(1, MAX_WEIGHT);
        let c = &mut self.classes[class.index()];
        let at = match c.flows.iter().position(|f| f.key == *key) {
            Some(i) => i,
            None => {
                c.flows.push(Flow {
                    key: key.clone(),
                    weight,
                    finish: 0,
                    items: VecDeque::new(),
                });
                c.flows.len() - 1
            }
        };
        let f = &mut c.flows[at];
        f.weight = weight;
        let tag = f.finish.max(c.clock) + UNIT / u64::from(weight);
        f.finish = tag;
        let id = self.next_id;
        self.next_id += 1;
        f.items.push_back(Entry { id, tag, item });
        self.len += 1;
        Ticket { id, class }
    }

    /// The next request to serve: from the highest class that has one, the smallest tag;
    /// on a tie, the flow with fewer requests waiting (a key that sends little goes
    /// before the backlog of one that floods: one slot turnover instead of two), then
    /// the earlier request.
    pub fn pop(&mut self) -> Option<(Ticket, Arc<str>, T)> {
        for class in Priority::ALL {
            let c = &mut self.classes[class.index()];
            let best = c
                .flows
                .iter()
                .enumerate()
                .filter_map(|(i, f)| f.items.front().map(|e| (e.tag, f.items.len(), e.id, i)))
                .min();
            let Some((tag, _, _, i)) = best else {
                continue;
            };
            let e = c.flows[i].items.pop_front().expect("a front was found");
            let key = c.flows[i].key.clone();
            c.clock = c.clock.max(tag);
            let clock = c.clock;
            c.flows.retain(|f| !f.items.is_empty() || f.finish > clock);
            self.len -= 1;
            return Some((Ticket { id: e.id, class }, key, e.item));
        }
        None
    }

    /// Takes the request `t` out, if it is still queued.
    pub fn remove(&mut self, t: Ticket) -> Option<T> {
        let c = &mut self.classes[t.class.index()];
        for f in &mut c.flows {
            if let Some(at) = f.items.iter().position(|e| e.id == t.id) {
                let e = f.items.remove(at).expect("position is in range");
                // The flow's newest request leaving gives its place in virtual time back.
                if at == f.items.len() {
                    f.finish = f.items.back().map_or(c.clock, |b| b.tag);
                }
                self.len -= 1;
                return Some(e.item);
            }
        }
        None
    }

    /// The newest request of `key`, from the lowest class it has requests in: the one
    /// a key over its share gives up.
    pub fn remove_newest_of(&mut self, key: &str) -> Option<(Ticket, T)> {
        for class in Priority::ALL.into_iter().rev() {
            let id = self.classes[class.index()]
                .flows
                .iter()
                .find(|f| &*f.key == key)
                .and_then(|f| f.items.back())
                .map(|e| e.id);
            if let Some(id) = id {
                let t = Ticket { id, class };
                return self.remove(t).map(|item| (t, item));
            }
        }
        None
    }

    /// The newest request of the lowest class below `class` that has one: the one a
    /// request of a higher class displaces from a full queue.
    pub fn remove_newest_below(&mut self, class: Priority) -> Option<(Ticket, T)> {
        for lower in Priority::ALL.into_iter().rev() {
            if lower <= class {
                return None;
            }
            let newest = self.classes[lower.index()]
                .flows
                .iter()
                .filter_map(|f| f.items.back())
                .max_by_key(|e| e.id)
                .map(|e| e.id);
            if let Some(id) = newest {
                let t = Ticket { id, class: lower };
                return self.remove(t).map(|item| (t, item));
            }
        }
        None
    }

    /// Each key with requests queued: how many (every class), and its weight.
    pub fn keys(&self) -> Vec<KeyLoad> {
        let mut out: Vec<KeyLoad> = Vec::new();
        for c in &self.classes {
            for f in c.flows.iter().filter(|f| !f.items.is_empty()) {
                match out.iter_mut().find(|k| k.key == f.key) {
                    Some(k) => k.queued += f.items.len(),
                    None => out.push(KeyLoad {
                        key: f.key.clone(),
                        queued: f.items.len(),
                        weight: f.weight,
                    }),
                }
            }
        }
        out
    }

    /// Requests queued by class and key.
    pub fn by_class_and_key(&self) -> Vec<(Priority, Arc<str>, usize)> {
        let mut out = Vec::new();
        for class in Priority::ALL {
            for f in &self.classes[class.index()].flows {
                if !f.items.is_empty() {
                    out.push((class, f.key.clone(), f.items.len()));
                }
            }
        }
        out
    }

    /// Requests queued in `class`.
    pub fn class_len(&self, class: Priority) -> usize {
        self.classes[class.index()]
            .flows
            .iter()
            .map(|f| f.items.len())
            .sum()
    }

    /// The least of `f` over the queued requests (the oldest arrival, for instance).
    pub fn oldest<K: Ord>(&self, f: impl Fn(&T) -> K) -> Option<K> {
        self.classes
            .iter()
            .flat_map(|c| c.flows.iter())
            .filter_map(|fl| fl.items.front().map(|e| f(&e.item)))
            .min()
    }

    /// Every queued request, taken out (highest class first).
    pub fn drain(&mut self) -> Vec<T> {
        let mut out = Vec::with_capacity(self.len);
        while let Some((_, _, item)) = self.pop() {
            out.push(item);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    #[test]
    fn a_flooding_key_gets_the_same_share_as_a_light_one() {
        let mut q = FairQueue::default();
        let (a, b) = (key("a"), key("b"));
        // A queues 100 before B's 10 arrive.
        for i in 0..100 {
            q.push(Priority::Normal, &a, 1, ("a", i));
        }
        for i in 0..10 {
            q.push(Priority::Normal, &b, 1, ("b", i));
        }
        let first: Vec<&str> = (0..20).map(|_| q.pop().unwrap().2 .0).collect();
        assert_eq!(first.iter().filter(|k| **k == "b").count(), 10, "{first:?}");
        // Each key's own requests stay in order.
        let mut q2 = FairQueue::default();
        for i in 0..5 {
            q2.push(Priority::Normal, &a, 1, i);
        }
        let order: Vec<i32> = std::iter::from_fn(|| q2.pop().map(|p| p.2)).collect();
        assert_eq!(order, [0, 1, 2, 3, 4]);
    }

    #[test]
    fn weights_split_the_slots() {
        let mut q = FairQueue::default();
        let (a, b) = (key("a"), key("b"));
        for _ in 0..300 {
            q.push(Priority::Normal, &a, 3, "a");
            q.push(Priority::Normal, &b, 1, "b");
        }
        let served: Vec<&str> = (0..200).map(|_| q.pop().unwrap().2).collect();
        let a_share = served.iter().filter(|k| **k == "a").count();
        assert!((148..=152).contains(&a_share), "{a_share} of 200");
    }

    #[test]
    fn an_idle_key_earns_no_credit() {
        let mut q = FairQueue::default();
        let (a, b) = (key("a"), key("b"));
        // B is served once, then A alone for a long while.
        q.push(Priority::Normal, &b, 1, "b");
        q.pop();
        for _ in 0..1000 {
            q.push(Priority::Normal, &a, 1, "a");
            q.pop();
        }
        // Now both queue 10: they alternate, B does not get 1000 in a row.
        for _ in 0..10 {
            q.push(Priority::Normal, &a, 1, "a");
            q.push(Priority::Normal, &b, 1, "b");
        }
        let served: Vec<&str> = (0..6).map(|_| q.pop().unwrap().2).collect();
        assert_eq!(
            served.iter().filter(|k| **k == "b").count(),
            3,
            "{served:?}"
        );
    }

    #[test]
    fn a_higher_class_is_served_first() {
        let mut q = FairQueue::default();
        let k = key("k");
        q.push(Priority::Low, &k, 1, "low");
        q.push(Priority::Normal, &k, 1, "normal");
        q.push(Priority::High, &k, 1, "high");
        let order: Vec<&str> = std::iter::from_fn(|| q.pop().map(|p| p.2)).collect();
        assert_eq!(order, ["high", "normal", "low"]);
        assert!(q.is_empty());
    }

    #[test]
    fn removal_and_eviction_take_the_right_request() {
        let mut q = FairQueue::default();
        let (a, b) = (key("a"), key("b"));
        let t0 = q.push(Priority::Normal, &a, 1, 0);
        let _t1 = q.push(Priority::Normal, &a, 1, 1);
        q.push(Priority::Low, &a, 1, 2);
        q.push(Priority::Normal, &b, 1, 3);
        assert_eq!(q.remove(t0), Some(0));
        assert_eq!(q.remove(t0), None, "gone already");
        assert_eq!(q.len(), 3);
        // A's newest in its lowest class.
        assert_eq!(q.remove_newest_of("a").unwrap().1, 2);
        assert_eq!(q.remove_newest_below(Priority::Normal), None);
        q.push(Priority::Low, &b, 1, 4);
        assert_eq!(q.remove_newest_below(Priority::High).unwrap().1, 4);
        assert_eq!(
            q.keys(),
            [
                KeyLoad {
                    key: a.clone(),
                    queued: 1,
                    weight: 1
                },
                KeyLoad {
                    key: b.clone(),
                    queued: 1,
                    weight: 1
                }
            ]
        );
        // B's request is tagged one turn ahead of A's second.
        assert_eq!(q.drain(), [3, 1]);
        assert_eq!(q.len(), 0);
    }
}
