//! The Solar Hijri (Jalali) calendar for citizen-facing text and for the rules stated in
//! it: dates in SMS and manifests are written in the Iranian civil calendar with Persian
//! digits (۰–۹); everything stored stays Gregorian. The arithmetic is ICU4X's
//! (`icu_calendar`, the Persian calendar), the one implementation in the workspace; this
//! module only adds the Persian month names and digits. It is checked against published
//! Nowruz dates.

use icu_calendar::Date as IcuDate;
use icu_calendar::cal::{Iso, Persian};
use time::{Date, Month};

/// Persian month names, Farvardin first.
pub const MONTHS: [&str; 12] = [
    "فروردین",
    "اردیبهشت",
    "خرداد",
    "تیر",
    "مرداد",
    "شهریور",
    "مهر",
    "آبان",
    "آذر",
    "دی",
    "بهمن",
    "اسفند",
];

/// A date of the Solar Hijri calendar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SolarHijri {
    /// Year (e.g. 1403).
    pub year: i32,
    /// Month 1–12 (1 = Farvardin).
    pub month: u8,
    /// Day 1–31.
    pub day: u8,
}

/// A date the calendar cannot represent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("date {0} cannot be converted between the Gregorian and Solar Hijri calendars")]
pub struct OutOfRange(pub String);

impl SolarHijri {
    /// The Solar Hijri date of a Gregorian date.
    pub fn from_gregorian(date: Date) -> Result<Self, OutOfRange> {
        let iso = IcuDate::try_new_iso(date.year(), u8::from(date.month()), date.day())
            .map_err(|_| OutOfRange(date.to_string()))?;
        let persian = iso.to_calendar(Persian);
        Ok(Self {
            year: persian.year().extended_year(),
            month: persian.month().ordinal,
            day: persian.day_of_month().0,
        })
    }

    /// The Gregorian date of this Solar Hijri date.
    pub fn to_gregorian(self) -> Result<Date, OutOfRange> {
        let out = || OutOfRange(format!("{}/{}/{}", self.year, self.month, self.day));
        let iso = IcuDate::try_new_persian(self.year, self.month, self.day)
            .map_err(|_| out())?
            .to_calendar(Iso);
        let month = Month::try_from(iso.month().ordinal).map_err(|_| out())?;
        Date::from_calendar_date(iso.year().extended_year(), month, iso.day_of_month().0)
            .map_err(|_| out())
    }

    /// Whether the year has 366 days (Esfand has 30 days).
    pub fn is_leap_year(year: i32) -> bool {
        IcuDate::try_new_persian(year, 1, 1).is_ok_and(|d| d.is_in_leap_year())
    }

    /// `۱ فروردین ۱۴۰۳`: day, month name and year in Persian digits.
    pub fn long(self) -> String {
        format!(
            "{} {} {}",
            persian_digits(&self.day.to_string()),
            MONTHS[usize::from(self.month.clamp(1, 12)) - 1],
            persian_digits(&self.year.to_string())
        )
    }

    /// `۱۴۰۳/۰۱/۰۱`: the numeric form in Persian digits.
    pub fn numeric(self) -> String {
        persian_digits(&format!(
            "{:04}/{:02}/{:02}",
            self.year, self.month, self.day
        ))
    }
}

/// Replaces ASCII digits with Persian digits (۰–۹).
pub fn persian_digits(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '0'..='9' => char::from_u32(0x06F0 + (c as u32 - '0' as u32)).unwrap_or(c),
            other => other,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    fn sh(year: i32, month: u8, day: u8) -> SolarHijri {
        SolarHijri { year, month, day }
    }

    #[test]
    fn nowruz_dates_match_the_official_calendar() {
        // 1 Farvardin as published (the March equinox day in Tehran).
        for (year, gregorian) in [
            (1395, date!(2016 - 03 - 20)),
            (1396, date!(2017 - 03 - 21)),
            (1399, date!(2020 - 03 - 20)),
            (1400, date!(2021 - 03 - 21)),
            (1401, date!(2022 - 03 - 21)),
            (1402, date!(2023 - 03 - 21)),
            (1403, date!(2024 - 03 - 20)),
            (1404, date!(2025 - 03 - 21)),
            (1405, date!(2026 - 03 - 21)),
        ] {
            assert_eq!(
                SolarHijri::from_gregorian(gregorian).unwrap(),
                sh(year, 1, 1),
                "{gregorian}"
            );
            assert_eq!(sh(year, 1, 1).to_gregorian().unwrap(), gregorian, "{year}");
            // The day before Nowruz is the last day of Esfand.
            let eve = SolarHijri::from_gregorian(gregorian.previous_day().unwrap()).unwrap();
            assert_eq!((eve.year, eve.month), (year - 1, 12));
            assert_eq!(
                eve.day,
                if SolarHijri::is_leap_year(year - 1) {
                    30
                } else {
                    29
                }
            );
        }
        // 1403 is a leap year: 30 Esfand 1403 = 2025-03-20.
        assert!(SolarHijri::is_leap_year(1403));
        assert!(!SolarHijri::is_leap_year(1402));
        assert_eq!(
            SolarHijri::from_gregorian(date!(2025 - 03 - 20)).unwrap(),
            sh(1403, 12, 30)
        );
    }

    #[test]
    fn known_dates_and_month_lengths() {
        // Islamic Revolution day: 22 Bahman 1357 = 1979-02-11.
        assert_eq!(
            SolarHijri::from_gregorian(date!(1979 - 02 - 11)).unwrap(),
            sh(1357, 11, 22)
        );
        // Yalda: 30 Azar 1402 = 2023-12-21; 1 Mehr 1403 = 2024-09-22.
        assert_eq!(
            SolarHijri::from_gregorian(date!(2023 - 12 - 21)).unwrap(),
            sh(1402, 9, 30)
        );
        assert_eq!(
            SolarHijri::from_gregorian(date!(2024 - 09 - 22)).unwrap(),
            sh(1403, 7, 1)
        );
        // Months 1–6 have 31 days, 7–11 have 30.
        assert_eq!(
            SolarHijri::from_gregorian(date!(2024 - 09 - 21)).unwrap(),
            sh(1403, 6, 31)
        );
    }

    #[test]
    fn every_day_round_trips_for_decades() {
        let mut d = date!(2000 - 01 - 01);
        let mut previous = SolarHijri::from_gregorian(d.previous_day().unwrap()).unwrap();
        while d < date!(2040 - 01 - 01) {
            let s = SolarHijri::from_gregorian(d).unwrap();
            assert_eq!(s.to_gregorian().unwrap(), d);
            // Consecutive days are consecutive Solar Hijri days.
            assert!(s > previous, "{d}");
            assert!(s.day == previous.day + 1 || s.day == 1, "{d}");
            previous = s;
            d = d.next_day().unwrap();
        }
    }

    #[test]
    fn persian_text() {
        assert_eq!(sh(1403, 1, 1).long(), "۱ فروردین ۱۴۰۳");
        assert_eq!(sh(1404, 12, 29).numeric(), "۱۴۰۴/۱۲/۲۹");
        assert_eq!(persian_digits("Box 12-0"), "Box ۱۲-۰");
    }
}
