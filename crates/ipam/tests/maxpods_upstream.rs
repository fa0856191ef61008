//! max-pods agrees with upstream's eni-max-pods.txt (uncapped, plain and custom networking).

use ipam::limits;
use ipam::maxpods::{max_pods, MaxPodsOptions};

#[test]
fn agrees_with_upstream_eni_max_pods() {
    let table = include_str!("data/eni-max-pods-sample.txt");
    let mut checked = 0;
    let mut missing = Vec::new();
    for line in table
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (t, plain, custom): (&str, u32, u32) =
            (f[0], f[1].parse().unwrap(), f[2].parse().unwrap());
        let Some(l) = limits::lookup(t) else {
            missing.push(t);
            continue;
        };
        let opts = MaxPodsOptions {
            uncapped: true,
            ..Default::default()
        };
        assert_eq!(max_pods(l, opts), plain, "{t}");
        assert_eq!(
            max_pods(
                l,
                MaxPodsOptions {
                    custom_networking: true,
                    ..opts
                }
            ),
            custom,
            "{t} custom networking"
        );
        checked += 1;
    }
    // moto's DescribeInstanceTypes data lacks a few types (c5a.metal, g4ad.xlarge, p3.2xlarge,
    // u-6tb1.metal): the daemon asks EC2's DescribeInstanceTypes for those at start.
    eprintln!("not in the limits table, not compared: {missing:?}");
    assert!(
        missing.len() <= 4,
        "more types missing from the limits table than known: {missing:?}"
    );
    assert!(checked >= 59, "only {checked} compared");
}
