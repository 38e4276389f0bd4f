//! Where today, this week and this billing period start, in the machine's
//! time zone: a day at local midnight, a week on Monday, a billing period
//! on day `--period-start-day` of the month (as vnstat's MonthRotate: a
//! period that starts on the 15th runs to the 14th of the next month).
//! Pure functions of an instant and a time zone, so that tests can set
//! both.

use jiff::{Timestamp, civil::Date, civil::Weekday, tz::TimeZone};

/// A period the totals are kept for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Period {
    Day,
    Week,
    Month,
}

impl Period {
    pub const ALL: [Period; 3] = [Period::Day, Period::Week, Period::Month];

    /// The `period` label value and the API's key.
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
        }
    }
}

/// The day of the month billing periods start on: 1 to 28 (every month
/// has it).
pub const MAX_START_DAY: u8 = 28;

fn midnight(date: Date, tz: &TimeZone) -> Option<i64> {
    date.to_zoned_datetime(tz.clone())
        .and_then(|day| day.start_of_day())
        .ok()
        .map(|start| start.timestamp().as_second())
}

/// The start (Unix seconds) of the `period` that `now` (Unix seconds) is
/// in, in `tz`; billing periods start on `start_day` (1 to 28).
pub fn period_start(period: Period, now: i64, tz: &TimeZone, start_day: u8) -> i64 {
    let fallback = now - now.rem_euclid(86_400);
    let Ok(ts) = Timestamp::from_second(now) else {
        return fallback;
    };
    let today = ts.to_zoned_datetime(tz.clone()).date();
    let start = match period {
        Period::Day => Some(today),
        Period::Week => {
            let mut day = today;
            for _ in 0..Weekday::Monday.until(today.weekday()) {
                day = match day.yesterday() {
                    Ok(d) => d,
                    Err(_) => return fallback,
                };
            }
            Some(day)
        }
        Period::Month => {
            let start_day = start_day.clamp(1, MAX_START_DAY) as i8;
            if today.day() >= start_day {
                Date::new(today.year(), today.month(), start_day).ok()
            } else {
                let (year, month) = if today.month() == 1 {
                    (today.year() - 1, 12)
                } else {
                    (today.year(), today.month() - 1)
                };
                Date::new(year, month, start_day).ok()
            }
        }
    };
    start.and_then(|d| midnight(d, tz)).unwrap_or(fallback)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str, tz: &str) -> (i64, TimeZone) {
        let tz = TimeZone::get(tz).unwrap();
        let zoned = text
            .parse::<jiff::civil::DateTime>()
            .unwrap()
            .to_zoned_datetime(tz.clone())
            .unwrap();
        (zoned.timestamp().as_second(), tz)
    }

    fn local(t: i64, tz: &TimeZone) -> String {
        Timestamp::from_second(t)
            .unwrap()
            .to_zoned_datetime(tz.clone())
            .datetime()
            .to_string()
    }

    #[test]
    fn days_weeks_and_billing_periods_start_where_people_expect() {
        // Wednesday 2026-12-02 18:30 in Berlin.
        let (now, tz) = at("2026-12-02T18:30", "Europe/Berlin");
        let start = |p, d| local(period_start(p, now, &tz, d), &tz);
        assert_eq!(start(Period::Day, 1), "2026-12-02T00:00:00");
        assert_eq!(start(Period::Week, 1), "2026-11-30T00:00:00");
        assert_eq!(start(Period::Month, 1), "2026-12-01T00:00:00");
        // A period from the 15th: the 2nd of December is in November's.
        assert_eq!(start(Period::Month, 15), "2026-11-15T00:00:00");
        assert_eq!(start(Period::Month, 2), "2026-12-02T00:00:00");
        // Over a year's end.
        let (jan, tz) = at("2027-01-03T09:00", "Europe/Berlin");
        assert_eq!(
            local(period_start(Period::Month, jan, &tz, 20), &tz),
            "2026-12-20T00:00:00"
        );
        // Sunday belongs to the week that started on Monday.
        assert_eq!(
            local(period_start(Period::Week, jan, &tz, 1), &tz),
            "2026-12-28T00:00:00"
        );
    }

    #[test]
    fn a_day_of_25_hours_and_a_half_hour_zone() {
        // Berlin leaves daylight saving time on 2026-10-25: that day has 25
        // hours, and it starts at midnight all the same.
        let (now, tz) = at("2026-10-25T23:30", "Europe/Berlin");
        let day = period_start(Period::Day, now, &tz, 1);
        assert_eq!(local(day, &tz), "2026-10-25T00:00:00");
        // 23:30 on the clock, 24.5 hours after midnight.
        assert_eq!(now - day, 24 * 3600 + 30 * 60);
        let (now, tz) = at("2026-12-02T00:10", "Asia/Kolkata");
        assert_eq!(
            local(period_start(Period::Day, now, &tz, 1), &tz),
            "2026-12-02T00:00:00"
        );
        assert_eq!(
            period_start(Period::Day, now, &tz, 1).rem_euclid(3600),
            1800
        );
    }
}
