//! When a mirror is synced: whether a request is served the mirror as it is, waits, backs
//! off, or updates it, as a pure function of the time, what the store knows of the mirror and
//! what the request asks. No I/O and no clock: [`super::Mirrors`] gathers a [`View`] under
//! the mirror's lock, asks [`next_step`], and carries out the [`Step`]; after an update that
//! failed, [`settle`] says what is kept of the failure.
//!
//! The rules, in the order they apply:
//! - a request for a mirror that does not exist fails at once with a failure remembered for
//!   its credentials (`FAILURE_CACHE_TTL`), or with that of the creation it waited for;
//! - a fresh mirror is served as it is (a hit): synced within `SYNC_STALE_AFTER`, or, for a
//!   want-miss or a push notice, synced after the request's instant;
//! - a stale mirror is served as it is while a sync failed within `SYNC_STALE_AFTER` or could
//!   not start within `SYNC_WAIT`; a want-miss or push notice shares a failed sync that started
//!   after its instant;
//! - want-miss syncs run at most once per `WANT_MISS_SYNC_INTERVAL`: the requests in between
//!   wait for the next one;
//! - anything else updates the mirror. A request that only needs some fresh mirror waits at
//!   most `SYNC_WAIT` for the mirror's lock and the sync slots ([`patience`]), then is served
//!   the mirror as it is; the others wait as long as it takes.
//!
//! A request that asks for newer data than `SYNC_STALE_AFTER` (a want-miss, a push notice)
//! asks a parent proxy to check its own upstream too ([`Freshness::revalidates`]).

use std::time::{Duration, Instant};

use crate::upstream;

/// How a request was served, as told in `X-Git-Proxy-Status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The mirror was created for this request.
    Clone,
    /// The mirror was synced for this request.
    Sync,
    /// The mirror was fresh enough.
    Hit,
    /// The sync failed; the existing mirror was served.
    Stale,
}

impl Status {
    /// The header value.
    pub fn as_str(&self) -> &'static str {
        match self {
            Status::Clone => "clone",
            Status::Sync => "sync",
            Status::Hit => "hit",
            Status::Stale => "stale",
        }
    }
}

/// When a sync is due.
#[derive(Debug, Clone, Copy)]
pub enum Freshness {
    /// When the last successful sync is older than `SYNC_STALE_AFTER`.
    IfStale,
    /// Unless a sync finished after this instant (a want-miss: the client saw newer refs).
    SyncedAfter(Instant),
    /// Unless a sync started after this instant: the upstream said it changed (a push
    /// webhook) or an operator asks for it (warm-up). `reason` is logged with the sync.
    Pushed {
        /// When the notice arrived: notices that arrive during one sync share the next.
        since: Instant,
        /// Why, for the log (`webhook`, `warm-up`).
        reason: &'static str,
    },
}

impl Freshness {
    /// Whether this asks for newer data than `SYNC_STALE_AFTER` would: a parent proxy is then
    /// asked to check its own upstream too (`Cache-Control: no-cache`).
    pub(super) fn revalidates(self) -> bool {
        !matches!(self, Freshness::IfStale)
    }

    /// Why an update for this request runs, for the log.
    pub(super) fn reason(self, exists: bool) -> &'static str {
        match self {
            _ if !exists => "new mirror",
            Freshness::IfStale => "stale",
            Freshness::SyncedAfter(_) => "want-miss",
            Freshness::Pushed { reason, .. } => reason,
        }
    }
}

/// Why a creation failed, as remembered: only answers of the upstream that another request
/// would get again, not transient failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Failure {
    AuthRequired,
    NotFound,
}

/// The settings the decision depends on.
#[derive(Debug, Clone, Copy)]
pub(super) struct Timing {
    /// `SYNC_STALE_AFTER`
    pub stale_after: Duration,
    /// `SYNC_WAIT`
    pub sync_wait: Duration,
    /// `WANT_MISS_SYNC_INTERVAL`
    pub want_miss_interval: Duration,
}

/// What the store knows of a mirror when a request holds its lock.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct View {
    /// The mirror is on disk, as seen once the request holds its lock (a creation it waited
    /// for has made it).
    pub exists: bool,
    /// The state is still the store's: eviction or a failed creation did not drop it while
    /// the request waited for the lock.
    pub current: bool,
    /// A failure to create the mirror remembered for the request's credentials.
    pub remembered: Option<Failure>,
    /// When the last successful sync started.
    pub last_sync: Option<Instant>,
    /// When the last failed sync started.
    pub last_failure: Option<Instant>,
    /// When the last want-miss sync started.
    pub last_want_miss: Option<Instant>,
    /// When a sync last could not start within `SYNC_WAIT`.
    pub last_busy: Option<Instant>,
    /// When the last creation attempt failed.
    pub last_error: Option<Instant>,
}

/// What a request asks of the mirror.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ask {
    /// How fresh it must be.
    pub freshness: Freshness,
    /// When the request came to the store.
    pub arrived: Instant,
}

/// What the request does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// Fail with the failure remembered for the request's credentials.
    Remembered(Failure),
    /// Fail with the error of the creation the request waited for.
    CreationFailed,
    /// The store dropped the state the request waited on: look the mirror up again.
    Retry,
    /// Serve the mirror as it is: it is fresh.
    Hit,
    /// Serve the mirror as it is on disk now: a sync is backing off.
    Stale,
    /// Wait until then (the next want-miss sync may start), and ask again.
    WaitUntil(Instant),
    /// Update the mirror, once the sync slots are taken, waiting for them until `slots_until`
    /// (`None`: as long as it takes); past it, serve the mirror as it is and back off.
    Update {
        /// How long the request waits for the sync slots.
        slots_until: Option<Instant>,
        /// The update is a want-miss sync: the next one waits `WANT_MISS_SYNC_INTERVAL`.
        want_miss: bool,
    },
}

impl Step {
    /// Whether the mirror's snapshot is checked against the disk first: whenever the step does
    /// not serve a fresh mirror, so that a mirror whose upstream fails is served as it is now
    /// (someone else may have changed it).
    pub(super) fn rereads(&self, view: &View) -> bool {
        view.exists && matches!(self, Step::Stale | Step::WaitUntil(_) | Step::Update { .. })
    }
}

/// How long a request waits for the mirror's lock and for the sync slots: one that only needs
/// some fresh mirror, which exists, waits at most `SYNC_WAIT` and is then served the mirror as
/// it is; `None`: as long as it takes.
pub(super) fn patience(exists: bool, ask: &Ask, timing: &Timing) -> Option<Instant> {
    if exists && matches!(ask.freshness, Freshness::IfStale) {
        Some(ask.arrived + timing.sync_wait)
    } else {
        None
    }
}

/// The remembered failure that answers a request, if any: only while there is no mirror (an
/// operator may have placed one since).
pub(super) fn remembered(exists: bool, failure: Option<Failure>) -> Option<Failure> {
    failure.filter(|_| !exists)
}

/// Whether `at` plus `window` is still ahead of `now` (a window too long to end never does).
fn within(now: Instant, at: Option<Instant>, window: Duration) -> bool {
    at.is_some_and(|t| t.checked_add(window).is_none_or(|end| now < end))
}

/// What a request that holds the mirror's lock does next (see the module documentation).
pub(super) fn next_step(now: Instant, view: &View, ask: &Ask, timing: &Timing) -> Step {
    if let Some(failure) = remembered(view.exists, view.remembered) {
        return Step::Remembered(failure);
    }
    if !view.exists && view.last_error.is_some_and(|t| t > ask.arrived) {
        return Step::CreationFailed;
    }
    if !view.current {
        return Step::Retry;
    }
    if view.exists {
        let fresh = match ask.freshness {
            Freshness::IfStale => view
                .last_sync
                .is_some_and(|t| now.saturating_duration_since(t) < timing.stale_after),
            Freshness::SyncedAfter(since) | Freshness::Pushed { since, .. } => {
                view.last_sync.is_some_and(|t| t > since)
            }
        };
        if fresh {
            return Step::Hit;
        }
        let backing_off = within(now, view.last_failure, timing.stale_after)
            || within(now, view.last_busy, timing.sync_wait);
        // A want-miss shares a failed attempt that started after it arrived, as it shares a
        // successful one: waiting requests do not each retry a failing upstream.
        let failed_since = |since: Instant| view.last_failure.is_some_and(|t| t > since);
        match ask.freshness {
            Freshness::IfStale if backing_off => return Step::Stale,
            Freshness::SyncedAfter(since) | Freshness::Pushed { since, .. }
                if failed_since(since) =>
            {
                return Step::Stale
            }
            Freshness::SyncedAfter(_)
                if within(now, view.last_want_miss, timing.want_miss_interval) =>
            {
                // One want-miss sync per interval; the requests waiting now share the next.
                let next = view
                    .last_want_miss
                    .and_then(|t| t.checked_add(timing.want_miss_interval))
                    .unwrap_or(now);
                return Step::WaitUntil(next);
            }
            _ => {}
        }
    }
    Step::Update {
        slots_until: patience(view.exists, ask, timing),
        want_miss: matches!(ask.freshness, Freshness::SyncedAfter(_)),
    }
}

/// What is kept of an update that failed with `error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Settled {
    /// There is no mirror and another request would get the same answer: remembered for
    /// `FAILURE_CACHE_TTL`, and the mirror's state dropped (an unknown repository costs no
    /// memory beyond the memo).
    Remember(Failure),
    /// The upstream refuses this client, or anonymous access to a mirror that is private from
    /// now on: its clients are checked before any sync, so the refusal is not recorded as a
    /// failed sync.
    Refused,
    /// The existing mirror is served as it is; the failure is recorded and starts a backoff.
    Stale,
    /// There is no mirror: the requests that waited for this creation get the error, and the
    /// mirror's state is dropped.
    Failed,
}

/// What is kept of an update of a mirror that existed (`exists`) or not, for a request with a
/// client's credentials (`from_client`, see [`super::Credentials::Client`]), that failed with
/// `error`.
pub(super) fn settle(exists: bool, from_client: bool, error: &upstream::Error) -> Settled {
    match error {
        upstream::Error::AuthRequired if !exists => Settled::Remember(Failure::AuthRequired),
        upstream::Error::NotFound if !exists => Settled::Remember(Failure::NotFound),
        upstream::Error::AuthRequired if from_client => Settled::Refused,
        _ if exists => Settled::Stale,
        _ => Settled::Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn timing() -> Timing {
        Timing {
            stale_after: 60 * SECOND,
            sync_wait: 5 * SECOND,
            want_miss_interval: 10 * SECOND,
        }
    }

    /// A clock for the tests: `at(n)` is `n` seconds after an arbitrary origin far from the
    /// edges of `Instant`.
    struct Clock(Instant);

    impl Clock {
        fn new() -> Clock {
            Clock(Instant::now())
        }

        fn at(&self, seconds: u64) -> Instant {
            self.0 + Duration::from_secs(seconds)
        }
    }

    fn existing() -> View {
        View {
            exists: true,
            current: true,
            ..View::default()
        }
    }

    fn absent() -> View {
        View {
            exists: false,
            current: true,
            ..View::default()
        }
    }

    /// The freshness kinds a request can ask for, all with the same instant.
    fn every_freshness(since: Instant) -> [Freshness; 3] {
        [
            Freshness::IfStale,
            Freshness::SyncedAfter(since),
            Freshness::Pushed {
                since,
                reason: "webhook",
            },
        ]
    }

    fn update(view: &View, ask: &Ask) -> Step {
        Step::Update {
            slots_until: patience(view.exists, ask, &timing()),
            want_miss: matches!(ask.freshness, Freshness::SyncedAfter(_)),
        }
    }

    #[test]
    fn a_mirror_never_synced_is_created_and_creations_wait_as_long_as_it_takes() {
        let clock = Clock::new();
        for freshness in every_freshness(clock.at(100)) {
            let ask = Ask {
                freshness,
                arrived: clock.at(100),
            };
            let step = next_step(clock.at(100), &absent(), &ask, &timing());
            let want_miss = matches!(freshness, Freshness::SyncedAfter(_));
            assert_eq!(
                step,
                Step::Update {
                    slots_until: None,
                    want_miss
                },
                "{freshness:?}"
            );
            assert!(!step.rereads(&absent()), "nothing to read yet");
        }
    }

    #[test]
    fn remembered_failures_answer_requests_for_absent_mirrors_only() {
        let clock = Clock::new();
        for failure in [Failure::AuthRequired, Failure::NotFound] {
            for freshness in every_freshness(clock.at(0)) {
                let ask = Ask {
                    freshness,
                    arrived: clock.at(0),
                };
                let view = View {
                    remembered: Some(failure),
                    ..absent()
                };
                assert_eq!(
                    next_step(clock.at(0), &view, &ask, &timing()),
                    Step::Remembered(failure)
                );
                // Even a state the store dropped: the memo answers first.
                let dropped = View {
                    current: false,
                    ..view
                };
                assert_eq!(
                    next_step(clock.at(0), &dropped, &ask, &timing()),
                    Step::Remembered(failure)
                );
                // An operator placed the mirror since: the memo no longer applies.
                let placed = View {
                    exists: true,
                    ..view
                };
                assert_ne!(
                    next_step(clock.at(0), &placed, &ask, &timing()),
                    Step::Remembered(failure)
                );
            }
            assert_eq!(remembered(false, Some(failure)), Some(failure));
            assert_eq!(remembered(true, Some(failure)), None);
        }
        assert_eq!(remembered(false, None), None);
    }

    #[test]
    fn requests_that_waited_for_a_failed_creation_share_its_error() {
        let clock = Clock::new();
        let ask = Ask {
            freshness: Freshness::IfStale,
            arrived: clock.at(10),
        };
        let failed_after = View {
            last_error: Some(clock.at(11)),
            ..absent()
        };
        assert_eq!(
            next_step(clock.at(12), &failed_after, &ask, &timing()),
            Step::CreationFailed
        );
        // A failure before the request arrived is not its creation's: it tries again.
        for at in [9, 10] {
            let failed_before = View {
                last_error: Some(clock.at(at)),
                ..absent()
            };
            assert_eq!(
                next_step(clock.at(12), &failed_before, &ask, &timing()),
                update(&failed_before, &ask)
            );
        }
        // A mirror that exists is served whatever an earlier creation did.
        let exists = View {
            last_sync: Some(clock.at(12)),
            ..failed_after
        };
        let exists = View {
            exists: true,
            ..exists
        };
        assert_eq!(next_step(clock.at(12), &exists, &ask, &timing()), Step::Hit);
    }

    #[test]
    fn a_state_the_store_dropped_is_looked_up_again() {
        let clock = Clock::new();
        for freshness in every_freshness(clock.at(0)) {
            let ask = Ask {
                freshness,
                arrived: clock.at(0),
            };
            for view in [existing(), absent()] {
                let view = View {
                    current: false,
                    last_sync: Some(clock.at(1)),
                    ..view
                };
                let step = next_step(clock.at(1), &view, &ask, &timing());
                assert_eq!(step, Step::Retry);
                assert!(!step.rereads(&view));
            }
        }
    }

    #[test]
    fn a_mirror_synced_within_stale_after_is_a_hit_and_then_it_is_synced() {
        let clock = Clock::new();
        let view = View {
            last_sync: Some(clock.at(100)),
            ..existing()
        };
        let ask = |now| Ask {
            freshness: Freshness::IfStale,
            arrived: clock.at(now),
        };
        for now in [100, 130, 159] {
            let step = next_step(clock.at(now), &view, &ask(now), &timing());
            assert_eq!(step, Step::Hit, "at {now}");
            assert!(!step.rereads(&view));
        }
        for now in [160, 1000] {
            let step = next_step(clock.at(now), &view, &ask(now), &timing());
            assert_eq!(
                step,
                Step::Update {
                    slots_until: Some(clock.at(now + 5)),
                    want_miss: false
                },
                "at {now}"
            );
            assert!(step.rereads(&view));
        }
    }

    #[test]
    fn an_existing_mirror_never_synced_is_synced() {
        // Adopted, or placed by an operator: no sync time on record.
        let clock = Clock::new();
        for freshness in every_freshness(clock.at(0)) {
            let ask = Ask {
                freshness,
                arrived: clock.at(0),
            };
            assert_eq!(
                next_step(clock.at(0), &existing(), &ask, &timing()),
                update(&existing(), &ask)
            );
        }
    }

    #[test]
    fn want_misses_and_push_notices_need_a_sync_after_their_instant() {
        let clock = Clock::new();
        for since in [10, 20] {
            let view = View {
                last_sync: Some(clock.at(20)),
                ..existing()
            };
            for freshness in &every_freshness(clock.at(since))[1..] {
                let ask = Ask {
                    freshness: *freshness,
                    arrived: clock.at(since),
                };
                // Within SYNC_STALE_AFTER either way: only the instant counts.
                let step = next_step(clock.at(21), &view, &ask, &timing());
                if since < 20 {
                    assert_eq!(step, Step::Hit, "{freshness:?}");
                } else {
                    assert_eq!(step, update(&view, &ask), "{freshness:?}");
                    assert_eq!(
                        step,
                        Step::Update {
                            slots_until: None,
                            want_miss: matches!(freshness, Freshness::SyncedAfter(_))
                        }
                    );
                }
            }
        }
    }

    #[test]
    fn a_failed_sync_serves_the_mirror_as_it_is_until_stale_after_has_passed_again() {
        let clock = Clock::new();
        let view = View {
            last_sync: Some(clock.at(0)),
            last_failure: Some(clock.at(100)),
            ..existing()
        };
        let ask = |now| Ask {
            freshness: Freshness::IfStale,
            arrived: clock.at(now),
        };
        for now in [100, 159] {
            let step = next_step(clock.at(now), &view, &ask(now), &timing());
            assert_eq!(step, Step::Stale, "at {now}");
            assert!(step.rereads(&view), "served as it is on disk now");
        }
        assert_eq!(
            next_step(clock.at(160), &view, &ask(160), &timing()),
            update(&view, &ask(160))
        );
    }

    #[test]
    fn a_sync_that_could_not_start_serves_the_mirror_as_it_is_for_sync_wait() {
        let clock = Clock::new();
        let view = View {
            last_sync: Some(clock.at(0)),
            last_busy: Some(clock.at(100)),
            ..existing()
        };
        let ask = |now| Ask {
            freshness: Freshness::IfStale,
            arrived: clock.at(now),
        };
        assert_eq!(
            next_step(clock.at(104), &view, &ask(104), &timing()),
            Step::Stale
        );
        assert_eq!(
            next_step(clock.at(105), &view, &ask(105), &timing()),
            update(&view, &ask(105))
        );
        // Want-misses and push notices are not served stale for a busy host: they wait.
        for freshness in &every_freshness(clock.at(101))[1..] {
            let ask = Ask {
                freshness: *freshness,
                arrived: clock.at(101),
            };
            assert_eq!(
                next_step(clock.at(101), &view, &ask, &timing()),
                update(&view, &ask)
            );
        }
    }

    #[test]
    fn want_misses_and_push_notices_share_a_failed_sync_that_started_after_them() {
        let clock = Clock::new();
        for freshness in &every_freshness(clock.at(50))[1..] {
            let ask = Ask {
                freshness: *freshness,
                arrived: clock.at(50),
            };
            let failed_after = View {
                last_sync: Some(clock.at(0)),
                last_failure: Some(clock.at(51)),
                ..existing()
            };
            assert_eq!(
                next_step(clock.at(52), &failed_after, &ask, &timing()),
                Step::Stale,
                "{freshness:?}"
            );
            // A failure before the request's instant is no answer to it, even within the
            // backoff of stale requests.
            let failed_before = View {
                last_failure: Some(clock.at(49)),
                ..failed_after
            };
            assert_eq!(
                next_step(clock.at(52), &failed_before, &ask, &timing()),
                update(&failed_before, &ask),
                "{freshness:?}"
            );
        }
    }

    #[test]
    fn want_miss_syncs_run_once_per_interval_and_the_others_wait_for_the_next() {
        let clock = Clock::new();
        let view = View {
            last_sync: Some(clock.at(100)),
            last_want_miss: Some(clock.at(100)),
            ..existing()
        };
        let want_miss = |now| Ask {
            freshness: Freshness::SyncedAfter(clock.at(now)),
            arrived: clock.at(now),
        };
        for now in [101, 109] {
            let step = next_step(clock.at(now), &view, &want_miss(now), &timing());
            assert_eq!(step, Step::WaitUntil(clock.at(110)), "at {now}");
            assert!(step.rereads(&view));
        }
        assert_eq!(
            next_step(clock.at(110), &view, &want_miss(110), &timing()),
            Step::Update {
                slots_until: None,
                want_miss: true
            }
        );
        // The interval holds want-misses only: push notices and stale requests go on.
        let pushed = Ask {
            freshness: Freshness::Pushed {
                since: clock.at(105),
                reason: "webhook",
            },
            arrived: clock.at(105),
        };
        assert_eq!(
            next_step(clock.at(105), &view, &pushed, &timing()),
            update(&view, &pushed)
        );
        let stale = Ask {
            freshness: Freshness::IfStale,
            arrived: clock.at(170),
        };
        assert_eq!(
            next_step(clock.at(170), &view, &stale, &timing()),
            update(&view, &stale)
        );
        // A want-miss answered by a sync after it does not wait.
        let answered = Ask {
            freshness: Freshness::SyncedAfter(clock.at(99)),
            arrived: clock.at(101),
        };
        assert_eq!(
            next_step(clock.at(101), &view, &answered, &timing()),
            Step::Hit
        );
    }

    #[test]
    fn only_requests_for_some_fresh_existing_mirror_are_impatient() {
        let clock = Clock::new();
        for freshness in every_freshness(clock.at(0)) {
            let ask = Ask {
                freshness,
                arrived: clock.at(7),
            };
            let expected = matches!(freshness, Freshness::IfStale).then(|| clock.at(12));
            assert_eq!(patience(true, &ask, &timing()), expected, "{freshness:?}");
            assert_eq!(patience(false, &ask, &timing()), None, "{freshness:?}");
        }
    }

    #[test]
    fn windows_too_long_to_end_never_end() {
        let clock = Clock::new();
        let forever = Timing {
            stale_after: Duration::MAX,
            sync_wait: Duration::MAX,
            want_miss_interval: Duration::MAX,
        };
        let view = View {
            last_sync: Some(clock.at(0)),
            last_failure: Some(clock.at(1)),
            last_want_miss: Some(clock.at(1)),
            ..existing()
        };
        let ask = Ask {
            freshness: Freshness::IfStale,
            arrived: clock.at(2),
        };
        assert_eq!(next_step(clock.at(2), &view, &ask, &forever), Step::Hit);
        let ask = Ask {
            freshness: Freshness::SyncedAfter(clock.at(2)),
            arrived: clock.at(2),
        };
        assert_eq!(
            next_step(clock.at(2), &view, &ask, &forever),
            Step::WaitUntil(clock.at(2)),
            "asks again at once rather than overflow"
        );
    }

    #[test]
    fn only_requests_that_ask_for_newer_data_revalidate_through_a_parent() {
        let clock = Clock::new();
        let [stale, want_miss, pushed] = every_freshness(clock.at(0));
        assert!(!stale.revalidates());
        assert!(want_miss.revalidates());
        assert!(pushed.revalidates());
        assert_eq!(stale.reason(false), "new mirror");
        assert_eq!(want_miss.reason(false), "new mirror");
        assert_eq!(stale.reason(true), "stale");
        assert_eq!(want_miss.reason(true), "want-miss");
        assert_eq!(pushed.reason(true), "webhook");
    }

    #[test]
    fn failed_updates_are_remembered_recorded_or_shared_by_kind() {
        let errors = [
            upstream::Error::AuthRequired,
            upstream::Error::NotFound,
            upstream::Error::Interrupted,
            upstream::Error::Local("disk full".into()),
        ];
        for from_client in [false, true] {
            for error in &errors {
                let creation = settle(false, from_client, error);
                let sync = settle(true, from_client, error);
                let expected_creation = match error {
                    upstream::Error::AuthRequired => Settled::Remember(Failure::AuthRequired),
                    upstream::Error::NotFound => Settled::Remember(Failure::NotFound),
                    _ => Settled::Failed,
                };
                let expected_sync = match error {
                    upstream::Error::AuthRequired if from_client => Settled::Refused,
                    _ => Settled::Stale,
                };
                assert_eq!(creation, expected_creation, "{error:?}, {from_client}");
                assert_eq!(sync, expected_sync, "{error:?}, {from_client}");
            }
        }
    }
}
