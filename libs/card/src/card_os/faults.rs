//! Fault knobs for simulated chips, so encoder-farm and personalization error paths can be
//! exercised on demand.

use std::time::Duration;

/// What can go wrong with a simulated card.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Faults {
    /// Dead chip: no ATR, never answers a command.
    pub dead: bool,
    /// Probability (0..=1) that an EEPROM write (UPDATE BINARY, key or reference data import)
    /// fails with 6581 and leaves the target unchanged.
    pub write_failure_rate: f64,
    /// Seed of the RNG that draws write failures (reproducible runs).
    pub seed: u64,
    /// Tearing: the card is pulled during this (1-based) UPDATE BINARY. Only the first half
    /// of that command's data reaches the EEPROM, the command gets no answer and the card is
    /// removed from the reader.
    pub tear_at_write: Option<u32>,
    /// Slow EEPROM: time every APDU takes on the chip, so that a whole personalization takes a
    /// realistic encode time.
    pub apdu_latency: Duration,
    /// Time the chip takes to generate one key pair (GENERATE ASYMMETRIC KEY PAIR), on top of
    /// the APDU latency: P-256 key generation on a real chip takes on the order of 100 ms.
    pub keygen_latency: Duration,
    /// The card leaves the reader before its first command: a feed jam, or a card pulled as
    /// it went in. Nothing was written to it.
    pub pulled_before_first_command: bool,
}

impl Faults {
    /// No faults.
    pub fn none() -> Self {
        Self::default()
    }
}

/// Why a card gave no response at all (as opposed to an error status word).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CardFault {
    /// The chip is dead: it never answers.
    #[error("chip does not answer")]
    Dead,
    /// The card left the reader (tearing); nothing more can be sent to it.
    #[error("card removed")]
    Removed,
    /// The card is not powered (no power-on / ATR yet).
    #[error("card not powered")]
    Unpowered,
}

/// A fault plan for a stock of blanks, as `cardpipe encoders simulate` flags describe it:
/// which blanks are dead or tear, and the knobs every blank shares.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FaultPlan {
    /// Every n-th blank (1-based: n, 2n, …) is a dead chip.
    pub dead_every: Option<u32>,
    /// Every n-th blank is pulled during write number `tear_at_write`.
    pub tear_every: Option<u32>,
    /// The UPDATE BINARY during which a tearing blank is pulled.
    pub tear_at_write: u32,
    /// Write failure probability of every blank.
    pub write_failure_rate: f64,
    /// Per-APDU latency of every blank.
    pub apdu_latency: Duration,
    /// Seed; blank n uses `seed + n`.
    pub seed: u64,
}

impl FaultPlan {
    /// The knobs of blank number `n` (0-based).
    pub fn faults_for(&self, n: u32) -> Faults {
        let hit = |every: Option<u32>| every.is_some_and(|e| e > 0 && (n + 1).is_multiple_of(e));
        Faults {
            dead: hit(self.dead_every),
            write_failure_rate: self.write_failure_rate,
            seed: self.seed.wrapping_add(u64::from(n)),
            tear_at_write: hit(self.tear_every).then_some(self.tear_at_write.max(1)),
            apdu_latency: self.apdu_latency,
            keygen_latency: Duration::ZERO,
            pulled_before_first_command: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_marks_every_nth_blank() {
        let plan = FaultPlan {
            dead_every: Some(3),
            tear_every: Some(2),
            tear_at_write: 5,
            ..FaultPlan::default()
        };
        let dead: Vec<bool> = (0..6).map(|n| plan.faults_for(n).dead).collect();
        assert_eq!(dead, [false, false, true, false, false, true]);
        assert_eq!(plan.faults_for(1).tear_at_write, Some(5));
        assert_eq!(plan.faults_for(0).tear_at_write, None);
        assert_ne!(plan.faults_for(0).seed, plan.faults_for(1).seed);
    }
}
