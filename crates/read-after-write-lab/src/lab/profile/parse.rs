//! Parsing profiles: one ([`Profile`]'s `FromStr`), or a comma-separated
//! list whose `steady:` profiles have commas of their own
//! ([`ProfileList`]).

use std::fmt;
use std::time::Duration;

use super::Profile;

/// The longest apply delay a `steady:` profile may give: the lab waits for
/// the replicas to catch up before each profile, which takes the delay,
/// and measures seconds per strategy, so a longer delay measures nothing
/// more than [`Profile::SteadyHigh`]'s kind of lag, only slower.
pub const MAX_APPLY_DELAY: Duration = Duration::from_secs(10);

/// The most replicas a `steady:` profile may list: each is a PostgreSQL
/// server on the lab's machine, beside the app and the load.
pub const MAX_REPLICAS: usize = 8;

/// What `steady:` is followed by, for error messages.
const STEADY_HINT: &str = "one apply delay per replica, e.g. steady:20ms,90ms,250ms \
                           (milliseconds: 20ms or plain 20; seconds: 1.5s)";

/// Checks the delays of a `steady:` profile: see
/// [`SteadyDelays`](super::SteadyDelays).
pub(super) fn check_delays(delays: &[Duration]) -> Result<(), String> {
    if delays.is_empty() {
        return Err(format!(
            "a steady profile needs at least one replica: {STEADY_HINT}"
        ));
    }
    if delays.len() > MAX_REPLICAS {
        return Err(format!(
            "a steady profile lists {} replicas; the lab starts at most {MAX_REPLICAS} \
             (each a PostgreSQL server on this machine)",
            delays.len()
        ));
    }
    for delay in delays {
        if *delay > MAX_APPLY_DELAY {
            return Err(format!(
                "an apply delay of {} ms is above the lab's limit of {} s: the lab waits \
                 that long for the replicas before each profile, and measures seconds",
                delay.as_millis(),
                MAX_APPLY_DELAY.as_secs()
            ));
        }
        if delay.subsec_nanos() % 1_000_000 != 0 {
            return Err(format!(
                "apply delays are whole milliseconds (recovery_min_apply_delay), not {delay:?}"
            ));
        }
    }
    Ok(())
}

/// One delay of a `steady:` profile: `20ms`, `20` (milliseconds), `1.5s`.
fn parse_delay(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, millis_per_unit) = if let Some(number) = text.strip_suffix("ms") {
        (number, 1.0)
    } else if let Some(number) = text.strip_suffix('s') {
        (number, 1000.0)
    } else {
        (text, 1.0)
    };
    let not_a_delay = || format!("{text:?} is not an apply delay: {STEADY_HINT}");
    let number = number.trim();
    if number.is_empty() || !number.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(not_a_delay());
    }
    let value: f64 = number.parse().map_err(|_| not_a_delay())?;
    let millis = value * millis_per_unit;
    if !millis.is_finite() || millis > MAX_APPLY_DELAY.as_millis() as f64 {
        return Err(format!(
            "an apply delay of {text} is above the lab's limit of {} s: the lab waits that \
             long for the replicas before each profile, and measures seconds",
            MAX_APPLY_DELAY.as_secs()
        ));
    }
    if millis.fract() != 0.0 {
        return Err(format!(
            "apply delays are whole milliseconds (recovery_min_apply_delay), not {text}"
        ));
    }
    Ok(Duration::from_millis(millis as u64))
}

impl std::str::FromStr for Profile {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Some(delays) = s.strip_prefix("steady:") {
            if delays.trim().is_empty() {
                return Err(format!(
                    "{s:?} lists no replica: a steady profile needs {STEADY_HINT}"
                ));
            }
            let delays = delays
                .split(',')
                .map(parse_delay)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|error| format!("in {s:?}: {error}"))?;
            return Profile::steady(delays).map_err(|error| format!("in {s:?}: {error}"));
        }
        Profile::ALL
            .into_iter()
            .find(|profile| profile.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown profile {s:?}; use steady-low, steady-high, skewed, spiky, burst \
                     or steady:<delay>,... with {STEADY_HINT}"
                )
            })
    }
}

/// Profiles separated by commas, as `--profile` takes them:
/// `steady:20ms,90ms,250ms,burst,spiky` is three profiles, the delays
/// after `steady:` being the ones up to the next name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProfileList(pub Vec<Profile>);

impl std::str::FromStr for ProfileList {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Each profile's text: a name, or `steady:` and the delays after it.
        let mut texts: Vec<String> = Vec::new();
        let mut in_steady = false;
        for piece in s.split(',').map(str::trim) {
            // A sign too, so `-5ms` is told off as a delay, not a name.
            let is_delay = piece.starts_with(|c: char| c.is_ascii_digit() || ".-+".contains(c));
            match texts.last_mut() {
                Some(text) if in_steady && is_delay => {
                    text.push(',');
                    text.push_str(piece);
                }
                _ if is_delay => {
                    return Err(format!(
                        "{piece:?} is an apply delay outside a steady profile: \
                         write steady:{piece}, or put it after steady:<delay>"
                    ))
                }
                _ if piece.is_empty() => {
                    return Err(format!(
                        "an empty profile in {s:?}: name each profile (steady-low, \
                         steady-high, skewed, spiky, burst, steady:<delay>,...)"
                    ))
                }
                _ => {
                    in_steady = piece.starts_with("steady:");
                    texts.push(piece.to_owned());
                }
            }
        }
        texts
            .iter()
            .map(|text| text.parse())
            .collect::<Result<Vec<Profile>, _>>()
            .map(ProfileList)
    }
}

impl fmt::Display for ProfileList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, profile) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{profile}")?;
        }
        Ok(())
    }
}
