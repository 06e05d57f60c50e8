//! The Solar Hijri (Jalali) calendar for citizen-facing text: dates in SMS are written in
//! the Iranian civil calendar with Persian digits (۰–۹); everything stored stays Gregorian.
//!
//! The conversion is the arithmetic of the jalaali algorithm (Borkowski's break years of the
//! 2820-year cycle, as used by jalaali-js): exact for the years this pipeline meets
//! (1 Farvardin of every year between 1178 and 3177 lands on the March equinox day the
//! Iranian calendar authority publishes). It is checked against known Nowruz dates.

use time::{Date, Month};

/// Years in which the leap-year rule changes (the jalaali break table).
const BREAKS: [i32; 20] = [
    -61, 9, 38, 199, 426, 686, 756, 818, 1111, 1181, 1210, 1635, 2060, 2097, 2192, 2262, 2324,
    2394, 2456, 3178,
];

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

/// A Gregorian date outside the supported range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("date {0} is outside the supported Solar Hijri range (1178–3177)")]
pub struct OutOfRange(pub String);

/// (leap offset, Gregorian year of Farvardin 1, March day of Farvardin 1).
fn jal_cal(jy: i32) -> Option<(i32, i32, u8)> {
    let gy = jy + 621;
    let mut leap_j = -14;
    let mut jp = BREAKS[0];
    if jy < jp || jy >= BREAKS[BREAKS.len() - 1] {
        return None;
    }
    let mut jump = 0;
    for &jm in &BREAKS[1..] {
        jump = jm - jp;
        if jy < jm {
            break;
        }
        leap_j += jump / 33 * 8 + (jump % 33) / 4;
        jp = jm;
    }
    let mut n = jy - jp;
    leap_j += n / 33 * 8 + ((n % 33) + 3) / 4;
    if jump % 33 == 4 && jump - n == 4 {
        leap_j += 1;
    }
    let leap_g = gy / 4 - ((gy / 100 + 1) * 3) / 4 - 150;
    let march = 20 + leap_j - leap_g;
    if jump - n < 6 {
        n = n - jump + (jump + 4) / 33 * 33;
    }
    let mut leap = (((n + 1) % 33) - 1) % 4;
    if leap == -1 {
        leap = 4;
    }
    Some((leap, gy, u8::try_from(march).ok()?))
}

impl SolarHijri {
    /// The Solar Hijri date of a Gregorian date.
    pub fn from_gregorian(date: Date) -> Result<Self, OutOfRange> {
        let out = || OutOfRange(date.to_string());
        let jdn = date.to_julian_day();
        let mut jy = date.year() - 621;
        let (_, gy, march) = jal_cal(jy).ok_or_else(out)?;
        let first = Date::from_calendar_date(gy, Month::March, march).map_err(|_| out())?;
        let mut k = jdn - first.to_julian_day();
        if k >= 0 {
            if k <= 185 {
                return Ok(Self {
                    year: jy,
                    month: (1 + k / 31) as u8,
                    day: (k % 31 + 1) as u8,
                });
            }
            k -= 186;
        } else {
            jy -= 1;
            k += 179;
            // The year before this Nowruz: its Esfand has 30 days when it is a leap year.
            let (prev_leap, _, _) = jal_cal(jy).ok_or_else(out)?;
            if prev_leap == 0 {
                k += 1;
            }
        }
        Ok(Self {
            year: jy,
            month: (7 + k / 30) as u8,
            day: (k % 30 + 1) as u8,
        })
    }

    /// The Gregorian date of this Solar Hijri date.
    pub fn to_gregorian(self) -> Result<Date, OutOfRange> {
        let out = || OutOfRange(format!("{}/{}/{}", self.year, self.month, self.day));
        let (_, gy, march) = jal_cal(self.year).ok_or_else(out)?;
        let first = Date::from_calendar_date(gy, Month::March, march).map_err(|_| out())?;
        let m = i32::from(self.month);
        let offset = (m - 1) * 31 - (m / 7) * (m - 7) + i32::from(self.day) - 1;
        Date::from_julian_day(first.to_julian_day() + offset).map_err(|_| out())
    }

    /// Whether the year has 366 days (Esfand has 30 days).
    pub fn is_leap_year(year: i32) -> bool {
        jal_cal(year).is_some_and(|(leap, _, _)| leap == 0)
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
