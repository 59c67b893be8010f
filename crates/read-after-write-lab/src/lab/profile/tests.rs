use std::time::Duration;

use super::*;

fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

fn steady(millis: &[u64]) -> Profile {
    Profile::steady(millis.iter().copied().map(ms).collect()).unwrap()
}

#[test]
fn every_profile_parses_back_from_its_name() {
    for profile in Profile::ALL {
        assert_eq!(profile.name().parse::<Profile>(), Ok(profile));
    }
    assert!("steady".parse::<Profile>().is_err());
}

#[test]
fn a_steady_profile_round_trips() {
    let profile: Profile = "steady:20ms,90ms,250ms".parse().unwrap();
    assert_eq!(profile, steady(&[20, 90, 250]));
    assert_eq!(profile.to_string(), "steady:20ms,90ms,250ms");
    assert_eq!(profile.to_string().parse::<Profile>(), Ok(profile.clone()));
    assert_eq!(profile.slug(), "steady-20ms-90ms-250ms");
    assert_eq!(profile.apply_delays(), [ms(20), ms(90), ms(250)]);
}

#[test]
fn steady_delays_take_milliseconds_or_seconds() {
    assert_eq!("steady:20".parse::<Profile>(), Ok(steady(&[20])));
    assert_eq!(
        "steady:1.5s, 0ms".parse::<Profile>(),
        Ok(steady(&[1500, 0]))
    );
    assert_eq!("steady:.25s".parse::<Profile>(), Ok(steady(&[250])));
    assert_eq!(
        "steady:2s".parse::<Profile>().unwrap().to_string(),
        "steady:2000ms"
    );
}

#[test]
fn bad_steady_profiles_say_why() {
    let error = |text: &str| text.parse::<Profile>().unwrap_err();
    // No replica at all.
    assert!(
        error("steady:").contains("no replica"),
        "{}",
        error("steady:")
    );
    assert!(error("steady: ").contains("no replica"));
    assert!(Profile::steady(Vec::new())
        .unwrap_err()
        .contains("at least one replica"));
    // Not a delay.
    for text in [
        "steady:fast",
        "steady:20m",
        "steady:-5ms",
        "steady:20ms,,90ms",
    ] {
        assert!(
            error(text).contains("is not an apply delay"),
            "{text}: {}",
            error(text)
        );
    }
    // Absurd delays are refused, not clamped.
    assert!(error("steady:20ms,11s").contains("limit of 10 s"));
    assert!(error("steady:1e9").contains("not an apply delay"));
    assert!(error("steady:99999999999999999999999").contains("limit of 10 s"));
    assert!(Profile::steady(vec![Duration::from_secs(60)])
        .unwrap_err()
        .contains("limit of 10 s"));
    // Sub-millisecond delays: recovery_min_apply_delay has none.
    assert!(error("steady:2.5ms").contains("whole milliseconds"));
    assert!(Profile::steady(vec![Duration::from_micros(2500)])
        .unwrap_err()
        .contains("whole milliseconds"));
    // Too many replicas.
    let nine = ["5ms"; MAX_REPLICAS + 1].join(",");
    assert!(error(&format!("steady:{nine}")).contains("at most 8"));
    assert!(format!("steady:{}", ["5ms"; MAX_REPLICAS].join(","))
        .parse::<Profile>()
        .is_ok());
    // Unknown names point at the custom form.
    assert!(error("steady-medium").contains("steady:<delay>"));
}

#[test]
fn a_list_keeps_steady_delays_together() {
    let list: ProfileList = "steady:20ms,90ms,250ms,burst,spiky".parse().unwrap();
    assert_eq!(
        list.0,
        [steady(&[20, 90, 250]), Profile::Burst, Profile::Spiky]
    );
    assert_eq!(list.to_string(), "steady:20ms,90ms,250ms,burst,spiky");
    let list: ProfileList = "skewed, steady:5,1s ,steady:40ms".parse().unwrap();
    assert_eq!(list.0, [Profile::Skewed, steady(&[5, 1000]), steady(&[40])]);
    assert_eq!(list.to_string().parse::<ProfileList>(), Ok(list));
}

#[test]
fn bad_lists_say_why() {
    let error = |text: &str| text.parse::<ProfileList>().unwrap_err();
    assert!(error("skewed,20ms").contains("outside a steady profile"));
    assert!(error("20ms").contains("outside a steady profile"));
    assert!(error("").contains("empty profile"));
    assert!(error("skewed,").contains("empty profile"));
    assert!(error("steady:5ms,-5ms").contains("is not an apply delay"));
    assert!(error("skewed,nope").contains("unknown profile \"nope\""));
}

#[test]
fn the_cluster_has_the_most_replicas_any_profile_lists() {
    assert_eq!(Profile::cluster_replicas(&[]), 2);
    assert_eq!(Profile::cluster_replicas(&[Profile::Skewed]), 2);
    assert_eq!(Profile::cluster_replicas(&[steady(&[20])]), 1);
    assert_eq!(
        Profile::cluster_replicas(&[Profile::Burst, steady(&[20, 90, 250])]),
        3
    );
}

#[test]
fn profiles_listing_fewer_replicas_repeat_their_last_delay() {
    assert_eq!(Profile::Skewed.delays_for(3), [ms(5), ms(150), ms(150)]);
    assert_eq!(Profile::SteadyLow.delays_for(1), [ms(5)]);
    assert_eq!(
        steady(&[20, 90]).delays_for(4),
        [ms(20), ms(90), ms(90), ms(90)]
    );
    assert_eq!(
        steady(&[20, 90, 250]).delays_for(3),
        [ms(20), ms(90), ms(250)]
    );
}

#[test]
fn describe_says_what_each_replica_gets() {
    assert_eq!(Profile::SteadyLow.describe(2), "both replicas 5 ms behind");
    assert_eq!(
        Profile::Skewed.describe(2),
        "replicas 5 ms and 150 ms behind"
    );
    assert_eq!(
        Profile::Skewed.describe(3),
        "replicas 5 ms, 150 ms and 150 ms behind \
         (the profile lists 2; the other replicas keep its last delay)"
    );
    assert_eq!(
        steady(&[20, 90, 250]).describe(3),
        "replicas 20 ms, 90 ms and 250 ms behind"
    );
    assert_eq!(steady(&[40]).describe(1), "the replica 40 ms behind");
    assert_eq!(
        Profile::SteadyHigh.describe(4),
        "all 4 replicas 150 ms behind (the profile lists 2; the other replicas keep its last delay)"
    );
    let spiky = Profile::Spiky.describe(3);
    assert!(spiky.starts_with("all 3 replicas 5 ms behind"), "{spiky}");
    assert!(spiky.contains("one replica at a time"), "{spiky}");
    assert!(spiky.contains("round the 3 replicas"), "{spiky}");
    let burst = Profile::Burst.describe(2);
    assert!(
        burst.starts_with("both replicas 5 ms behind; 4 transactions at once rewriting"),
        "{burst}"
    );
    assert!(burst.contains(&format!("{BALLAST_ROWS} rows")), "{burst}");
}

#[test]
fn report_info_has_every_replicas_delay() {
    let info = ProfileInfo::new(&Profile::Skewed, 3);
    assert_eq!(info.apply_delays_ms, [5, 150, 150]);
    assert_eq!(info.description, Profile::Skewed.describe(3));
    assert_eq!(
        serde_json::to_value(&info.profile).unwrap(),
        serde_json::json!("skewed")
    );
    assert_eq!(
        serde_json::to_value(steady(&[20, 90])).unwrap(),
        serde_json::json!("steady:20ms,90ms")
    );
}

#[test]
fn which_profiles_make_naive_go_back_in_time() {
    assert!(Profile::Skewed.replicas_differ());
    assert!(Profile::Spiky.replicas_differ());
    assert!(!Profile::SteadyLow.replicas_differ());
    assert!(!Profile::Burst.replicas_differ());
    assert!(steady(&[20, 90, 250]).replicas_differ());
    assert!(!steady(&[20, 90]).replicas_differ());
    assert!(!steady(&[250]).replicas_differ());
}
