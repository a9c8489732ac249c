//! A deterministic generator of realistic product-analytics events, for benchmarks, load tests
//! and `prismctl gen`.
//!
//! Realism that matters for analytics engines: a power-law number of sessions per person (a few
//! heavy users, a long tail), persons joining over the whole range, about 50 event types with
//! skewed popularity, sessions of events seconds apart with a daily rhythm, and typed properties
//! (strings of low and high cardinality, numbers, booleans). The same seed gives the same events
//! on every machine (ChaCha8), so peers in a benchmark answer over identical data.
//!
//! Events are produced one day at a time, sorted by time within the day, so memory stays at one
//! day's worth whatever the total.

use crate::event::{Event, PropValue};
use chrono::{Duration, NaiveDate};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The 50 event names, most popular first.
pub const EVENT_NAMES: [&str; 50] = [
    "pageview",
    "click",
    "app_open",
    "scroll",
    "search",
    "view_item",
    "login",
    "add_to_cart",
    "play_video",
    "like",
    "share",
    "signup_started",
    "checkout_started",
    "comment",
    "purchase",
    "signup_completed",
    "logout",
    "pause_video",
    "complete_video",
    "follow",
    "open_notification",
    "dismiss_notification",
    "settings_changed",
    "feature_used",
    "filter_applied",
    "sort_changed",
    "bookmark_added",
    "download",
    "upload",
    "remove_from_cart",
    "invite_sent",
    "invite_accepted",
    "profile_updated",
    "report_viewed",
    "dashboard_viewed",
    "help_opened",
    "error_shown",
    "feedback_submitted",
    "trial_started",
    "trial_converted",
    "subscription_started",
    "subscription_cancelled",
    "password_reset",
    "rate_app",
    "bookmark_removed",
    "unfollow",
    "export_clicked",
    "import_started",
    "import_completed",
    "app_close",
];

const BROWSERS: [(&str, f64); 5] = [
    ("Chrome", 0.60),
    ("Safari", 0.20),
    ("Firefox", 0.10),
    ("Edge", 0.07),
    ("Opera", 0.03),
];
const OSES: [(&str, f64); 5] = [
    ("Windows", 0.35),
    ("Mac OS X", 0.20),
    ("iOS", 0.20),
    ("Android", 0.20),
    ("Linux", 0.05),
];
const PLANS: [(&str, f64); 3] = [("free", 0.70), ("pro", 0.25), ("enterprise", 0.05)];
const COUNTRIES: [&str; 30] = [
    "US", "IN", "DE", "GB", "BR", "FR", "JP", "CA", "ES", "IT", "NL", "PL", "MX", "AU", "SE", "TR",
    "KR", "ID", "AR", "UA", "CH", "BE", "AT", "NO", "DK", "FI", "PT", "CZ", "IE", "NZ",
];

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenConfig {
    /// The seed: the same seed gives the same events.
    pub seed: u64,
    /// Total number of events.
    pub events: u64,
    /// Days covered, starting at `start`.
    pub days: u32,
    /// First day (UTC).
    pub start: NaiveDate,
    /// Number of persons; by default one per 60 events.
    pub persons: Option<u64>,
    /// Share of persons who start anonymous and are identified (`$identify`) in their first
    /// session.
    pub identify_share: f64,
}

impl Default for GenConfig {
    fn default() -> GenConfig {
        GenConfig {
            seed: 42,
            events: 1_000_000,
            days: 90,
            start: NaiveDate::from_ymd_opt(2024, 1, 1).expect("valid date"),
            persons: None,
            identify_share: 0.0,
        }
    }
}

#[derive(Debug, Clone)]
struct Person {
    first_day: u32,
    browser: &'static str,
    os: &'static str,
    plan: &'static str,
    country: &'static str,
    is_mobile: bool,
    anonymous_until_identify: bool,
    seen: bool,
}

/// The generator: an iterator of events in time order.
#[derive(Debug)]
pub struct Generator {
    config: GenConfig,
    rng: ChaCha8Rng,
    persons: Vec<Person>,
    /// Cumulative activity weights of `persons`, which are sorted by `first_day`.
    cumulative: Vec<f64>,
    event_cumulative: Vec<f64>,
    page_cumulative: Vec<f64>,
    day: u32,
    emitted: u64,
    buffer: std::vec::IntoIter<Event>,
    next_message: u64,
    next_session: u64,
}

fn zipf_cumulative(n: usize, s: f64) -> Vec<f64> {
    let mut acc = 0.0;
    (1..=n)
        .map(|k| {
            acc += 1.0 / (k as f64).powf(s);
            acc
        })
        .collect()
}

fn pick_cumulative(rng: &mut ChaCha8Rng, cumulative: &[f64], len: usize) -> usize {
    let total = cumulative[len - 1];
    let x = rng.random::<f64>() * total;
    cumulative[..len].partition_point(|&c| c <= x).min(len - 1)
}

fn pick_weighted<T: Copy>(rng: &mut ChaCha8Rng, items: &[(T, f64)]) -> T {
    let mut x = rng.random::<f64>();
    for (item, w) in items {
        if x < *w {
            return *item;
        }
        x -= w;
    }
    items[items.len() - 1].0
}

impl Generator {
    /// A generator for `config`.
    pub fn new(config: GenConfig) -> Generator {
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let person_count = config.persons.unwrap_or((config.events / 60).max(1)).max(1);
        let mut persons: Vec<(Person, f64)> = (0..person_count)
            .map(|_| {
                // Pareto-distributed activity (alpha 1.16, the "80/20" shape), capped so one
                // person cannot take over a small data set.
                let u: f64 = rng.random_range(1e-9..1.0);
                let weight = u.powf(-1.0 / 1.16).min(1_000.0);
                let person = Person {
                    first_day: rng.random_range(0..config.days.max(1)),
                    browser: pick_weighted(&mut rng, &BROWSERS),
                    os: pick_weighted(&mut rng, &OSES),
                    plan: pick_weighted(&mut rng, &PLANS),
                    country: COUNTRIES[rng
                        .random_range(0..COUNTRIES.len())
                        .min(rng.random_range(0..COUNTRIES.len()))],
                    is_mobile: rng.random_bool(0.4),
                    anonymous_until_identify: rng
                        .random_bool(config.identify_share.clamp(0.0, 1.0)),
                    seen: false,
                };
                (person, weight)
            })
            .collect();
        // Early joiners first, so the persons active on day d are a prefix.
        persons.sort_by_key(|(p, _)| p.first_day);
        let mut acc = 0.0;
        let cumulative = persons
            .iter()
            .map(|(_, w)| {
                acc += w;
                acc
            })
            .collect();
        Generator {
            rng,
            persons: persons.into_iter().map(|(p, _)| p).collect(),
            cumulative,
            event_cumulative: zipf_cumulative(EVENT_NAMES.len(), 1.0),
            page_cumulative: zipf_cumulative(200, 1.1),
            day: 0,
            emitted: 0,
            buffer: Vec::new().into_iter(),
            next_message: 0,
            next_session: 0,
            config,
        }
    }

    fn day_quota(&self, day: u32) -> u64 {
        let days = u64::from(self.config.days.max(1));
        let base = self.config.events / days;
        if u64::from(day) + 1 == days {
            self.config.events - base * (days - 1)
        } else {
            base
        }
    }

    fn message_id(&mut self) -> String {
        self.next_message += 1;
        format!("{:x}-{:x}", self.config.seed, self.next_message)
    }

    fn generate_day(&mut self, day: u32) -> Vec<Event> {
        let quota = self.day_quota(day) as usize;
        let mut events = Vec::with_capacity(quota + 64);
        let active = self.persons.partition_point(|p| p.first_day <= day).max(1);
        let day_start_ms = (self.config.start + Duration::days(i64::from(day)))
            .and_hms_opt(0, 0, 0)
            .expect("midnight exists")
            .and_utc()
            .timestamp_millis();
        while events.len() < quota {
            let pi = pick_cumulative(&mut self.rng, &self.cumulative, active);
            // A daily rhythm: most sessions start in the afternoon and evening (UTC).
            let hour = (self.rng.random::<f64>() * 24.0 * 0.5
                + self.rng.random::<f64>() * 24.0 * 0.5
                + 4.0) as i64
                % 24;
            let mut t = day_start_ms + hour * 3_600_000 + self.rng.random_range(0..3_600_000);
            self.next_session += 1;
            let session_id = format!("s{:x}-{:x}", self.config.seed, self.next_session);
            let length =
                1 + (self.rng.random::<f64>().max(1e-12).ln() / (1.0f64 - 1.0 / 8.0).ln()) as usize;
            let id = pi as u64;
            let person = self.persons[pi].clone();
            let first_session = !person.seen;
            self.persons[pi].seen = true;
            let user_id = format!("user-{id}");
            let anon_id = format!("anon-{id}");
            let mut distinct_id = if first_session && person.anonymous_until_identify {
                anon_id.clone()
            } else {
                user_id.clone()
            };
            for k in 0..length.min(60) {
                if events.len() >= quota {
                    break;
                }
                let name = if k == 0 {
                    if person.is_mobile {
                        "app_open"
                    } else {
                        "pageview"
                    }
                } else {
                    EVENT_NAMES
                        [pick_cumulative(&mut self.rng, &self.event_cumulative, EVENT_NAMES.len())]
                };
                let mut properties = vec![
                    (
                        "$session_id".to_string(),
                        PropValue::Str(session_id.clone()),
                    ),
                    (
                        "$browser".to_string(),
                        PropValue::Str(person.browser.to_string()),
                    ),
                    ("$os".to_string(), PropValue::Str(person.os.to_string())),
                    (
                        "country".to_string(),
                        PropValue::Str(person.country.to_string()),
                    ),
                    ("plan".to_string(), PropValue::Str(person.plan.to_string())),
                    ("is_mobile".to_string(), PropValue::Bool(person.is_mobile)),
                ];
                match name {
                    "pageview" => {
                        let page = pick_cumulative(&mut self.rng, &self.page_cumulative, 200);
                        properties.push((
                            "$current_url".to_string(),
                            PropValue::Str(format!("https://example.com/page/{page}")),
                        ));
                    }
                    "purchase" | "add_to_cart" | "checkout_started" => {
                        let price = (self.rng.random::<f64>().powi(3) * 500.0 * 100.0).round()
                            / 100.0
                            + 1.0;
                        properties.push(("price".to_string(), PropValue::Num(price)));
                    }
                    "play_video" | "complete_video" | "pause_video" => {
                        properties.push((
                            "duration_ms".to_string(),
                            PropValue::Num(f64::from(self.rng.random_range(1_000..3_600_000))),
                        ));
                    }
                    "search" => {
                        let term = pick_cumulative(&mut self.rng, &self.page_cumulative, 200);
                        properties.push((
                            "search_term".to_string(),
                            PropValue::Str(format!("term {term}")),
                        ));
                    }
                    _ => {}
                }
                let person_set = if first_session && k == 0 {
                    vec![
                        ("plan".to_string(), PropValue::Str(person.plan.to_string())),
                        (
                            "country".to_string(),
                            PropValue::Str(person.country.to_string()),
                        ),
                    ]
                } else {
                    Vec::new()
                };
                let message_id = self.message_id();
                events.push(Event {
                    message_id,
                    distinct_id: distinct_id.clone(),
                    event: name.to_string(),
                    timestamp_ms: t,
                    properties,
                    person_set,
                    person_set_once: Vec::new(),
                });
                t += self.rng.random_range(5_000..120_000);
                if first_session
                    && person.anonymous_until_identify
                    && k == 1
                    && events.len() < quota
                {
                    // The person logs in during the first session: `$identify` links the
                    // anonymous id, and later events carry the user id.
                    let message_id = self.message_id();
                    events.push(Event {
                        message_id,
                        distinct_id: user_id.clone(),
                        event: "$identify".to_string(),
                        timestamp_ms: t,
                        properties: vec![(
                            "$anon_distinct_id".to_string(),
                            PropValue::Str(anon_id.clone()),
                        )],
                        person_set: Vec::new(),
                        person_set_once: Vec::new(),
                    });
                    distinct_id = user_id.clone();
                    t += 1_000;
                }
            }
        }
        events.sort_by_key(|e| e.timestamp_ms);
        events
    }
}

impl Iterator for Generator {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(e) = self.buffer.next() {
                self.emitted += 1;
                return Some(e);
            }
            if self.day >= self.config.days.max(1) || self.emitted >= self.config.events {
                return None;
            }
            let day = self.day;
            self.day += 1;
            self.buffer = self.generate_day(day).into_iter();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn small(seed: u64) -> GenConfig {
        GenConfig {
            seed,
            events: 20_000,
            days: 10,
            ..GenConfig::default()
        }
    }

    #[test]
    fn same_seed_same_events() {
        let a: Vec<Event> = Generator::new(small(7)).collect();
        let b: Vec<Event> = Generator::new(small(7)).collect();
        assert_eq!(a.len(), 20_000);
        assert_eq!(a, b);
        let c: Vec<Event> = Generator::new(small(8)).collect();
        assert_ne!(a, c);
    }

    #[test]
    fn activity_is_skewed_and_types_are_many() {
        let events: Vec<Event> = Generator::new(small(1)).collect();
        let mut per_person: HashMap<&str, usize> = HashMap::new();
        let mut names: HashMap<&str, usize> = HashMap::new();
        for e in &events {
            *per_person.entry(&e.distinct_id).or_default() += 1;
            *names.entry(&e.event).or_default() += 1;
        }
        let mut counts: Vec<usize> = per_person.values().copied().collect();
        counts.sort_unstable_by(|a, b| b.cmp(a));
        let top_decile: usize = counts[..counts.len() / 10].iter().sum();
        assert!(
            top_decile * 3 > events.len(),
            "top 10% of persons should send over a third of events"
        );
        assert!(names.len() >= 40, "only {} event types", names.len());
        assert!(
            events
                .windows(2)
                .all(|w| w[0].timestamp_ms <= w[1].timestamp_ms
                    || w[1].timestamp_ms % 86_400_000 < w[0].timestamp_ms % 86_400_000)
        );
    }

    #[test]
    fn identify_share_emits_identify_events() {
        let config = GenConfig {
            identify_share: 0.5,
            ..small(3)
        };
        let events: Vec<Event> = Generator::new(config).collect();
        assert!(events.iter().any(|e| e.event == "$identify"));
        assert!(events.iter().any(|e| e.distinct_id.starts_with("anon-")));
    }
}
