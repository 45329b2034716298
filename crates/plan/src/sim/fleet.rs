//! The simulated fleet: workers with slots, requests in flight, and the router's queue. Events change it;
//! it never looks at the clock itself.

use std::collections::{BTreeSet, VecDeque};

/// Where a worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Getting a node, pulling, loading: costs money, serves nothing.
    Starting,
    /// Taking requests.
    Ready,
    /// Finishing what it runs (scaled down, or given a spot notice); takes nothing new.
    Draining,
    /// Gone: no cost from `ended`.
    Gone,
}

/// One worker.
#[derive(Debug, Clone)]
pub struct Worker {
    /// Its stage.
    pub stage: Stage,
    /// On spot capacity.
    pub spot: bool,
    /// When its pod was created (billing starts).
    pub created: f64,
    /// When it went away (billing ends).
    pub ended: Option<f64>,
    /// The requests it runs.
    pub running: Vec<usize>,
}

/// A request in the fleet.
#[derive(Debug, Clone, Copy)]
pub struct Request {
    /// When the client sent it.
    pub arrival: f64,
    /// Prompt tokens.
    pub input: f64,
    /// Tokens to generate in all.
    pub output: f64,
    /// Tokens already streamed (a migrated request continues from here).
    pub streamed: f64,
    /// When the client saw its first token.
    pub first_token: Option<f64>,
    /// When its current run's first token (or resumed token) comes.
    pub run_first: f64,
    /// Seconds per token in its current run.
    pub tpot: f64,
    /// The worker running it.
    pub worker: usize,
    /// Bumped when it moves, so that events of an earlier run are ignored.
    pub epoch: u32,
}

/// Workers, requests and the queue.
#[derive(Debug, Default)]
pub struct Fleet {
    /// Every worker ever started (indices stay valid).
    pub workers: Vec<Worker>,
    /// Ready workers by (requests running, index): the least loaded first.
    free: BTreeSet<(u32, usize)>,
    /// Slots per worker.
    pub slots: u32,
    /// Requests by id (a slab).
    requests: Vec<Option<Request>>,
    /// Unused request ids.
    spare_ids: Vec<usize>,
    /// Requests waiting for a slot, oldest first (migrated ones go to the front).
    pub queue: VecDeque<usize>,
}

impl Fleet {
    /// An empty fleet whose workers run `slots` requests each.
    pub fn new(slots: u32) -> Fleet {
        Fleet {
            slots,
            ..Fleet::default()
        }
    }

    /// Adds a worker in `stage` (Starting or Ready); returns its index.
    pub fn add_worker(&mut self, now: f64, spot: bool, stage: Stage) -> usize {
        let id = self.workers.len();
        self.workers.push(Worker {
            stage: Stage::Starting,
            spot,
            created: now,
            ended: None,
            running: Vec::new(),
        });
        if stage == Stage::Ready {
            self.set_ready(id);
        }
        id
    }

    /// A started worker becomes ready (if it was not removed meanwhile).
    pub fn set_ready(&mut self, w: usize) {
        if self.workers[w].stage == Stage::Starting {
            self.workers[w].stage = Stage::Ready;
            self.free.insert((0, w));
        }
    }

    /// Stops sending `w` work; it goes away at once if idle. Returns whether it is gone.
    pub fn drain(&mut self, now: f64, w: usize) -> bool {
        let worker = &mut self.workers[w];
        match worker.stage {
            Stage::Starting => self.end(now, w),
            Stage::Ready => {
                self.free.remove(&(worker.running.len() as u32, w));
                worker.stage = Stage::Draining;
                if worker.running.is_empty() {
                    self.end(now, w);
                }
            }
            Stage::Draining | Stage::Gone => {}
        }
        self.workers[w].stage == Stage::Gone
    }

    /// The worker is gone.
    pub fn end(&mut self, now: f64, w: usize) {
        let worker = &mut self.workers[w];
        if worker.stage == Stage::Ready {
            self.free.remove(&(worker.running.len() as u32, w));
        }
        worker.stage = Stage::Gone;
        worker.ended = Some(now);
    }

    /// Workers that count as replicas: starting or ready.
    pub fn replicas(&self) -> impl Iterator<Item = usize> + '_ {
        self.workers
            .iter()
            .enumerate()
            .filter(|(_, w)| matches!(w.stage, Stage::Starting | Stage::Ready))
            .map(|(i, _)| i)
    }

    /// Workers alive (billed).
    pub fn alive(&self) -> usize {
        self.workers.iter().filter(|w| w.stage != Stage::Gone).count()
    }

    /// The least loaded ready worker with a free slot.
    pub fn pick(&self) -> Option<usize> {
        self.free.first().filter(|&&(n, _)| n < self.slots).map(|&(_, w)| w)
    }

    /// Stores a new request; returns its id.
    pub fn admit(&mut self, r: Request) -> usize {
        match self.spare_ids.pop() {
            Some(id) => {
                self.requests[id] = Some(r);
                id
            }
            None => {
                self.requests.push(Some(r));
                self.requests.len() - 1
            }
        }
    }

    /// The request `id`.
    pub fn request(&mut self, id: usize) -> &mut Request {
        self.requests[id].as_mut().expect("a live request")
    }

    /// Runs request `id` on worker `w`: returns the concurrency it runs at (itself included).
    pub fn start(&mut self, id: usize, w: usize) -> u32 {
        let n = self.workers[w].running.len() as u32;
        self.free.remove(&(n, w));
        self.free.insert((n + 1, w));
        self.workers[w].running.push(id);
        self.request(id).worker = w;
        n + 1
    }

    /// Request `id` left worker `w` (finished or moved); returns whether a draining worker just emptied.
    pub fn leave(&mut self, now: f64, id: usize, w: usize) -> bool {
        let worker = &mut self.workers[w];
        let n = worker.running.len() as u32;
        worker.running.retain(|&r| r != id);
        match worker.stage {
            Stage::Ready => {
                self.free.remove(&(n, w));
                self.free.insert((n - 1, w));
                false
            }
            Stage::Draining if worker.running.is_empty() => {
                self.end(now, w);
                true
            }
            _ => false,
        }
    }

    /// Forgets a finished request.
    pub fn finish(&mut self, id: usize) -> Request {
        let r = self.requests[id].take().expect("a live request");
        self.spare_ids.push(id);
        r
    }

    /// Requests running on ready workers.
    pub fn running(&self) -> u64 {
        self.free.iter().map(|&(n, _)| u64::from(n)).sum()
    }

    /// KV-cache usage averaged over ready workers: each running request holds its prompt and the tokens
    /// generated so far, in 16-position blocks, out of a pool of `pool_tokens` positions per worker.
    pub fn kv_usage(&self, now: f64, pool_tokens: f64) -> f64 {
        if self.free.is_empty() {
            return 0.0;
        }
        let held: f64 = self
            .free
            .iter()
            .flat_map(|&(_, w)| self.workers[w].running.iter())
            .filter_map(|&id| self.requests[id].as_ref())
            .map(|r| {
                let generated = if now > r.run_first {
                    r.streamed + (now - r.run_first) / r.tpot
                } else {
                    r.streamed
                };
                ((r.input + generated.min(r.output)) / 16.0).ceil() * 16.0
            })
            .sum();
        held / (self.free.len() as f64 * pool_tokens)
    }
}
