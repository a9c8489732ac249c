//! Calendar buckets in a project time zone (`spec/analytics.md` §1.2).
//!
//! A date range covers `[from 00:00 local, (to + 1 day) 00:00 local)`. Buckets are computed as a
//! sorted list of UTC instants, so DST days of 23 or 25 hours and repeated local hours are exact:
//! an event's bucket is found by binary search on its instant, never by wall-clock arithmetic.
//! Weekly and monthly buckets are clipped to the range and labelled with their calendar start;
//! every insight uses the same rule.

use chrono::{
    Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, Offset, TimeZone, Timelike, Weekday,
};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

/// The width of a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Interval {
    /// One local clock hour.
    Hour,
    /// One local calendar day.
    Day,
    /// One local calendar week, starting on the project's week start.
    Week,
    /// One local calendar month.
    Month,
}

/// The first day of a calendar week.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeekStart {
    /// ISO weeks.
    #[default]
    Monday,
    /// US-style weeks.
    Sunday,
}

/// The instant at which a local date starts in `tz` (the first valid instant when midnight
/// falls into a DST gap).
pub fn local_midnight_ms(tz: Tz, date: NaiveDate) -> i64 {
    let mut naive: NaiveDateTime = date.and_hms_opt(0, 0, 0).expect("midnight exists");
    loop {
        match tz.from_local_datetime(&naive) {
            LocalResult::Single(t) => return t.timestamp_millis(),
            LocalResult::Ambiguous(earliest, _) => return earliest.timestamp_millis(),
            LocalResult::None => naive += Duration::minutes(15),
        }
    }
}

/// The local calendar date of an instant.
pub fn local_date(tz: Tz, ms: i64) -> NaiveDate {
    tz.timestamp_millis_opt(ms)
        .single()
        .expect("valid instant")
        .date_naive()
}

/// Buckets of a query range.
#[derive(Debug, Clone, PartialEq)]
pub struct Buckets {
    /// Start instant (epoch ms) of each bucket, ascending.
    pub starts_ms: Vec<i64>,
    /// End of the range (exclusive), epoch ms.
    pub end_ms: i64,
    /// The label of each bucket: `YYYY-MM-DD` for days, weeks and months, and local
    /// `YYYY-MM-DDTHH:MM:SS±HH:MM` for hours (the offset keeps repeated DST hours apart).
    pub labels: Vec<String>,
}

impl Buckets {
    /// Buckets of `[from, to]` (inclusive local dates) in `tz`.
    pub fn new(
        from: NaiveDate,
        to: NaiveDate,
        tz: Tz,
        interval: Interval,
        week_start: WeekStart,
    ) -> Buckets {
        let start_ms = local_midnight_ms(tz, from);
        let end_ms = local_midnight_ms(tz, to.succ_opt().expect("date in range"));
        let mut starts_ms = Vec::new();
        let mut labels = Vec::new();
        match interval {
            Interval::Hour => {
                // A bucket per local clock hour and UTC offset: a new bucket starts wherever
                // the local (date, hour, offset) changes. Every offset in the tz database is a
                // whole number of quarter hours, so scanning in 15-minute steps finds every
                // start, including after 30-minute DST changes (Lord Howe) and in repeated hours.
                let key = |t: i64| {
                    let local = tz.timestamp_millis_opt(t).single().expect("valid instant");
                    (
                        local.date_naive(),
                        local.hour(),
                        local.offset().fix().local_minus_utc(),
                    )
                };
                let mut t = start_ms;
                let mut last = None;
                while t < end_ms {
                    let k = key(t);
                    if last != Some(k) {
                        starts_ms.push(t);
                        let local = tz.timestamp_millis_opt(t).single().expect("valid instant");
                        labels.push(local.format("%Y-%m-%dT%H:%M:%S%:z").to_string());
                        last = Some(k);
                    }
                    t += 15 * 60_000;
                }
            }
            Interval::Day => {
                let mut d = from;
                while d <= to {
                    starts_ms.push(local_midnight_ms(tz, d));
                    labels.push(d.format("%Y-%m-%d").to_string());
                    d = d.succ_opt().expect("date in range");
                }
            }
            Interval::Week | Interval::Month => {
                let mut calendar_start = period_start(from, interval, week_start);
                while calendar_start <= to {
                    let clipped = calendar_start.max(from);
                    starts_ms.push(local_midnight_ms(tz, clipped));
                    labels.push(calendar_start.format("%Y-%m-%d").to_string());
                    calendar_start = next_period(calendar_start, interval);
                }
            }
        }
        Buckets {
            starts_ms,
            end_ms,
            labels,
        }
    }

    /// Number of buckets.
    pub fn len(&self) -> usize {
        self.starts_ms.len()
    }

    /// True when the range has no bucket (never for a valid range).
    pub fn is_empty(&self) -> bool {
        self.starts_ms.is_empty()
    }

    /// Start of the range, epoch ms.
    pub fn start_ms(&self) -> i64 {
        self.starts_ms.first().copied().unwrap_or(self.end_ms)
    }

    /// The bucket holding instant `ms`, if it is inside the range.
    pub fn index_of(&self, ms: i64) -> Option<usize> {
        if ms < self.start_ms() || ms >= self.end_ms {
            return None;
        }
        Some(self.starts_ms.partition_point(|&s| s <= ms) - 1)
    }
}

/// Number of buckets `[from, to]` would have, computed without materializing them (used to
/// refuse absurd ranges before allocating).
pub fn bucket_count_estimate(from: NaiveDate, to: NaiveDate, interval: Interval) -> i64 {
    let days = (to - from).num_days() + 1;
    match interval {
        Interval::Hour => days * 25,
        Interval::Day => days,
        Interval::Week => days / 7 + 2,
        Interval::Month => days / 28 + 2,
    }
}

fn period_start(d: NaiveDate, interval: Interval, week_start: WeekStart) -> NaiveDate {
    match interval {
        Interval::Week => {
            let first = match week_start {
                WeekStart::Monday => Weekday::Mon,
                WeekStart::Sunday => Weekday::Sun,
            };
            let back = (7 + d.weekday().num_days_from_monday() - first.num_days_from_monday()) % 7;
            d - Duration::days(i64::from(back))
        }
        Interval::Month => d.with_day(1).expect("day 1 exists"),
        Interval::Hour | Interval::Day => d,
    }
}

fn next_period(d: NaiveDate, interval: Interval) -> NaiveDate {
    match interval {
        Interval::Week => d + Duration::days(7),
        Interval::Month => {
            let (y, m) = if d.month() == 12 {
                (d.year() + 1, 1)
            } else {
                (d.year(), d.month() + 1)
            };
            NaiveDate::from_ymd_opt(y, m, 1).expect("first of month exists")
        }
        Interval::Hour | Interval::Day => d.succ_opt().expect("date in range"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn date(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    #[test]
    fn new_york_days_follow_local_midnight() {
        let tz: Tz = "America/New_York".parse().unwrap();
        let b = Buckets::new(
            date("2024-03-01"),
            date("2024-03-03"),
            tz,
            Interval::Day,
            WeekStart::Monday,
        );
        assert_eq!(b.labels, ["2024-03-01", "2024-03-02", "2024-03-03"]);
        // 03:00Z on Mar 1 is Feb 29 in New York: outside the range.
        let ms = |s: &str| {
            chrono::DateTime::parse_from_rfc3339(s)
                .unwrap()
                .timestamp_millis()
        };
        assert_eq!(b.index_of(ms("2024-03-01T03:00:00Z")), None);
        assert_eq!(b.index_of(ms("2024-03-01T09:00:00Z")), Some(0));
        assert_eq!(b.index_of(ms("2024-03-02T02:30:00Z")), Some(0));
        assert_eq!(b.index_of(ms("2024-03-04T02:00:00Z")), Some(2));
    }

    #[test]
    fn dst_days_have_23_and_25_hours() {
        let tz: Tz = "Europe/Berlin".parse().unwrap();
        let spring = Buckets::new(
            date("2024-03-31"),
            date("2024-03-31"),
            tz,
            Interval::Hour,
            WeekStart::Monday,
        );
        assert_eq!(spring.len(), 23);
        let autumn = Buckets::new(
            date("2024-10-27"),
            date("2024-10-27"),
            tz,
            Interval::Hour,
            WeekStart::Monday,
        );
        assert_eq!(autumn.len(), 25);
        // The repeated 02:00 hour is two buckets with different labels.
        assert_eq!(autumn.labels[2], "2024-10-27T02:00:00+02:00");
        assert_eq!(autumn.labels[3], "2024-10-27T02:00:00+01:00");
    }

    #[test]
    fn weeks_are_clipped_and_labelled_with_their_start() {
        let b = Buckets::new(
            date("2024-01-03"),
            date("2024-01-15"),
            Tz::UTC,
            Interval::Week,
            WeekStart::Monday,
        );
        assert_eq!(b.labels, ["2024-01-01", "2024-01-08", "2024-01-15"]);
        assert_eq!(b.start_ms(), local_midnight_ms(Tz::UTC, date("2024-01-03")));
        let m = Buckets::new(
            date("2024-01-15"),
            date("2024-03-01"),
            Tz::UTC,
            Interval::Month,
            WeekStart::Monday,
        );
        assert_eq!(m.labels, ["2024-01-01", "2024-02-01", "2024-03-01"]);
    }
}
