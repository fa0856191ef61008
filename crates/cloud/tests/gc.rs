//! The leaked-ENI collector against the simulated VPC, over a matrix of ENIs: ours or not (tags,
//! description), old, young, untagged or unreadable age, attached or not, this cluster or another.

use cloud::aws::AwsEc2;
use cloud::gc::{self, LeakScan, CLUSTER_TAG, CREATED_AT_TAG, INSTANCE_TAG, NO_MANAGE_TAG};
use cloud::throttle::Pacing;
use cloud::{CreateEni, Ec2, EniQuery};
use simvpc_http::{ServeConfig, Server};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

struct Case {
    name: &'static str,
    description: &'static str,
    tags: Vec<(&'static str, String)>,
    attach: bool,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collects_only_old_available_enis_of_ours() {
    let running = Server::start(&ServeConfig::example(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let ec2 = AwsEc2::for_endpoint(&running.ec2_url, "us-west-2", Pacing::default());
    let instance = running.instances[0].instance_id.clone();
    let subnet = running.names.subnets["node-a"].clone();
    let now = SystemTime::now();
    let old = gc::format_rfc3339(now - Duration::from_secs(3600));
    let young = gc::format_rfc3339(now - Duration::from_secs(60));
    let ours = |created: Option<&str>, cluster: &str| {
        let mut tags = vec![
            (INSTANCE_TAG, "i-0dead".to_string()),
            (CLUSTER_TAG, cluster.to_string()),
        ];
        if let Some(created) = created {
            tags.push((CREATED_AT_TAG, created.to_string()));
        }
        tags
    };
    let cases = vec![
        Case {
            name: "old",
            description: "aws-K8S-i-0dead",
            tags: ours(Some(&old), "prod"),
            attach: false,
        },
        Case {
            name: "young",
            description: "aws-K8S-i-0dead",
            tags: ours(Some(&young), "prod"),
            attach: false,
        },
        Case {
            name: "untagged-age",
            description: "aws-K8S-i-0dead",
            tags: ours(None, "prod"),
            attach: false,
        },
        Case {
            name: "unreadable-age",
            description: "aws-K8S-i-0dead",
            tags: ours(Some("last tuesday"), "prod"),
            attach: false,
        },
        Case {
            name: "attached",
            description: "aws-K8S-i-0dead",
            tags: ours(Some(&old), "prod"),
            attach: true,
        },
        Case {
            name: "other-cluster",
            description: "aws-K8S-i-0dead",
            tags: ours(Some(&old), "staging"),
            attach: false,
        },
        Case {
            name: "not-our-description",
            description: "database",
            tags: ours(Some(&old), "prod"),
            attach: false,
        },
        Case {
            // Someone took a detached ENI of ours for their own use and said so.
            name: "no-manage",
            description: "aws-K8S-i-0dead",
            tags: {
                let mut tags = ours(Some(&old), "prod");
                tags.push((NO_MANAGE_TAG, "true".into()));
                tags
            },
            attach: false,
        },
        Case {
            name: "no-instance-tag",
            description: "aws-K8S-i-0dead",
            tags: vec![(CLUSTER_TAG, "prod".into()), (CREATED_AT_TAG, old.clone())],
            attach: false,
        },
    ];
    let mut ids = BTreeMap::new();
    for case in &cases {
        let mut tags: Vec<(String, String)> = case
            .tags
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        tags.push(("case".into(), case.name.into()));
        let eni = ec2
            .create_network_interface(&CreateEni {
                subnet_id: subnet.clone(),
                description: case.description.into(),
                tags,
                ..Default::default()
            })
            .await
            .unwrap();
        if case.attach {
            ec2.attach_network_interface(&eni.id, &instance, 1, 0)
                .await
                .unwrap();
        }
        ids.insert(case.name, eni.id);
    }
    let vpc_id = running.vpc.lock().unwrap().vpc_id.clone();
    let scan = LeakScan {
        vpc_id,
        cluster_name: Some("prod".into()),
    };
    let report = gc::collect_leaked_enis(&ec2, &scan, now).await.unwrap();
    assert_eq!(report.deleted, [ids["old"].clone()]);
    assert_eq!(report.too_young, [ids["young"].clone()]);
    let mut tagged = report.tagged.clone();
    tagged.sort();
    let mut expected = vec![ids["untagged-age"].clone(), ids["unreadable-age"].clone()];
    expected.sort();
    assert_eq!(tagged, expected, "an unreadable age is re-tagged and kept");
    let mut not_ours = report.not_ours.clone();
    not_ours.sort();
    let mut expected = vec![ids["not-our-description"].clone(), ids["no-manage"].clone()];
    expected.sort();
    assert_eq!(not_ours, expected);

    let remaining = ec2
        .describe_network_interfaces(&EniQuery {
            filters: vec![("tag-key".into(), vec!["case".into()])],
            ..Default::default()
        })
        .await
        .unwrap();
    let remaining: BTreeMap<String, &cloud::Eni> = remaining
        .iter()
        .map(|e| (e.tags["case"].clone(), e))
        .collect();
    assert!(!remaining.contains_key("old"));
    for kept in [
        "young",
        "untagged-age",
        "unreadable-age",
        "attached",
        "other-cluster",
        "not-our-description",
        "no-manage",
        "no-instance-tag",
    ] {
        assert!(remaining.contains_key(kept), "{kept} was deleted");
    }
    let retagged = remaining["unreadable-age"].tags[CREATED_AT_TAG].as_str();
    assert!(gc::parse_rfc3339(retagged).is_some(), "{retagged}");

    // An hour later the re-tagged ENIs are old enough; the others are still not ours.
    let later = gc::collect_leaked_enis(&ec2, &scan, now + Duration::from_secs(3600))
        .await
        .unwrap();
    let mut deleted = later.deleted.clone();
    deleted.sort();
    let mut expected = vec![
        ids["young"].clone(),
        ids["untagged-age"].clone(),
        ids["unreadable-age"].clone(),
    ];
    expected.sort();
    assert_eq!(deleted, expected);
}
