//! One ENI lifecycle through the real AWS SDK, run twice: against the project's simulated VPC over
//! HTTP (strict EC2 semantics: limits, prefixes, device indexes) and against moto server (a
//! third-party EC2 emulator: an independent check of request and reply shapes and error parsing).

use cloud::aws::AwsEc2;
use cloud::throttle::Pacing;
use cloud::{CreateEni, Ec2, EniQuery, ErrorKind};
use ipam::net::Ipv6Cidr;
use ipam::ownership::InterfaceType;
use simvpc_http::{ServeConfig, Server};
use std::io::Write;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SG: &str = "sg-0000000000000001";

struct Target {
    ec2: AwsEc2,
    instance_id: String,
    subnet_id: String,
    /// Whether the far side enforces EC2's semantics (moto does not: no limits, no prefixes).
    strict: bool,
    /// A subnet without an IPv6 block, where the far side has one.
    ipv4_only_subnet: Option<String>,
}

fn tag(key: &str, value: &str) -> (String, String) {
    (key.to_string(), value.to_string())
}

async fn lifecycle(t: &Target) {
    let instance = t.ec2.describe_instance(&t.instance_id).await.unwrap();
    assert_eq!(instance.id, t.instance_id);
    assert_eq!(instance.enis.len(), 1, "{instance:?}");
    let primary = &instance.enis[0];
    assert!(!primary.mac.is_empty());

    // The limits EC2 reports are the ones the built-in table was generated from.
    let limits = t.ec2.describe_instance_type("m5.large").await.unwrap();
    assert_eq!(&limits, ipam::limits::lookup("m5.large").unwrap());
    if t.strict {
        let unknown = t
            .ec2
            .describe_instance_type("m5.enormous")
            .await
            .unwrap_err();
        assert_eq!(unknown.kind, ErrorKind::NotFound, "{unknown}");
    }

    let created = t
        .ec2
        .create_network_interface(&CreateEni {
            subnet_id: t.subnet_id.clone(),
            description: format!("aws-K8S-{}", t.instance_id),
            security_groups: vec![SG.into()],
            secondary_ips: 2,
            prefixes: 0,
            tags: vec![tag("node.k8s.amazonaws.com/instance_id", &t.instance_id)],
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(created.id.starts_with("eni-"), "{created:?}");
    assert_eq!(created.secondary_ips.len(), 2, "{created:?}");
    assert_eq!(
        created.tags.get("node.k8s.amazonaws.com/instance_id"),
        Some(&t.instance_id)
    );

    let attachment = t
        .ec2
        .attach_network_interface(&created.id, &t.instance_id, 1, 0)
        .await
        .unwrap();
    t.ec2
        .set_delete_on_termination(&created.id, &attachment)
        .await
        .unwrap();
    let assigned = t.ec2.assign_private_ips(&created.id, 3).await.unwrap();
    // moto lists every secondary address of the ENI here; EC2 lists the new ones.
    if t.strict {
        assert_eq!(assigned.len(), 3);
    } else {
        assert!(assigned.len() >= 3, "{assigned:?}");
    }
    t.ec2
        .create_tags(
            &created.id,
            &[tag("cluster.k8s.amazonaws.com/name", "conformance")],
        )
        .await
        .unwrap();

    let by_id = t
        .ec2
        .describe_network_interfaces(&EniQuery::by_id(&created.id))
        .await
        .unwrap();
    assert_eq!(by_id.len(), 1);
    let eni = &by_id[0];
    if t.strict {
        assert_eq!(eni.secondary_ips.len(), 5, "{eni:?}");
        assert!(
            assigned.iter().all(|ip| eni.secondary_ips.contains(ip)),
            "{eni:?}"
        );
    }
    let attached = eni.attachment.as_ref().expect("attached");
    assert_eq!(attached.device_index, 1);
    assert_eq!(attached.id, attachment);
    let by_tag = t
        .ec2
        .describe_network_interfaces(&EniQuery {
            filters: vec![(
                "tag:cluster.k8s.amazonaws.com/name".into(),
                vec!["conformance".into()],
            )],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        by_tag.iter().map(|e| &e.id).collect::<Vec<_>>(),
        [&created.id]
    );

    let new_secondaries: Vec<_> = assigned
        .iter()
        .copied()
        .filter(|ip| eni.secondary_ips.contains(ip))
        .collect();
    t.ec2
        .unassign(&created.id, &new_secondaries, &[])
        .await
        .unwrap();

    ipv6_prefixes(t, &created.id).await;
    if t.strict {
        trunk_and_branch(t).await;
    }

    if t.strict {
        assert!(attached.delete_on_termination);
        let prefixes = t.ec2.assign_prefixes(&created.id, 1).await.unwrap();
        assert_eq!(prefixes.len(), 1);
        assert_eq!(prefixes[0].prefix_len(), 28);
        t.ec2.unassign(&created.id, &[], &prefixes).await.unwrap();
        let over = t
            .ec2
            .assign_private_ips(&created.id, 100)
            .await
            .unwrap_err();
        assert_eq!(over.kind, ErrorKind::AddressLimitExceeded, "{over}");
        let in_use = t
            .ec2
            .delete_network_interface(&created.id)
            .await
            .unwrap_err();
        assert_eq!(in_use.kind, ErrorKind::InUse, "{in_use}");
        let taken = t
            .ec2
            .attach_network_interface(&created.id, &t.instance_id, 0, 0)
            .await
            .unwrap_err();
        assert_eq!(taken.kind, ErrorKind::InUse, "{taken}");
    }

    t.ec2.detach_network_interface(&attachment).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = t
            .ec2
            .describe_network_interfaces(&EniQuery::by_id(&created.id))
            .await
            .unwrap();
        if now[0].status == "available" {
            break;
        }
        assert!(Instant::now() < deadline, "never detached: {now:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    t.ec2.delete_network_interface(&created.id).await.unwrap();
    // Deleting or detaching what is gone is done, not an error.
    t.ec2.delete_network_interface(&created.id).await.unwrap();
    t.ec2.detach_network_interface(&attachment).await.unwrap();
    let gone = t
        .ec2
        .describe_network_interfaces(&EniQuery::by_id(&created.id))
        .await
        .unwrap_err();
    assert_eq!(gone.kind, ErrorKind::NotFound, "{gone}");
    let no_subnet = t
        .ec2
        .create_network_interface(&CreateEni {
            subnet_id: "subnet-0000000000000dead".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(no_subnet.kind, ErrorKind::NotFound, "{no_subnet}");

    if t.strict {
        // A creation whose reply was lost is repeated with its token: EC2 hands back the same ENI.
        let request = CreateEni {
            subnet_id: t.subnet_id.clone(),
            secondary_ips: 1,
            client_token: cloud::aws::client_token(),
            ..Default::default()
        };
        let first = t.ec2.create_network_interface(&request).await.unwrap();
        let again = t.ec2.create_network_interface(&request).await.unwrap();
        assert_eq!(first.id, again.id);
        assert_eq!(first.secondary_ips, again.secondary_ips);
        let other = t
            .ec2
            .create_network_interface(&CreateEni {
                client_token: cloud::aws::client_token(),
                ..request.clone()
            })
            .await
            .unwrap();
        assert_ne!(other.id, first.id);
        for id in [&first.id, &other.id] {
            t.ec2.delete_network_interface(id).await.unwrap();
        }
    }
}

async fn described(t: &Target, eni_id: &str) -> Vec<Ipv6Cidr> {
    let query = EniQuery::by_id(eni_id);
    t.ec2.describe_network_interfaces(&query).await.unwrap()[0]
        .ipv6_prefixes
        .clone()
}

/// IPv6 prefix delegation on an attached ENI. moto accepts the calls but ignores Ipv6PrefixCount and
/// Ipv6Prefix (it delegates no prefixes), so there only the request and reply shapes are checked.
async fn ipv6_prefixes(t: &Target, eni_id: &str) {
    let delegated = t.ec2.assign_ipv6_prefixes(eni_id, 2).await.unwrap();
    t.ec2
        .unassign_ipv6_prefixes(eni_id, &delegated)
        .await
        .unwrap();
    if !t.strict {
        assert!(
            delegated.is_empty(),
            "moto has learnt IPv6 prefixes: {delegated:?}"
        );
        return;
    }
    let subnets = t
        .ec2
        .describe_subnets(&[("subnet-id".into(), vec![t.subnet_id.clone()])])
        .await
        .unwrap();
    let block = subnets[0]
        .ipv6_cidr
        .expect("the node's subnet has an IPv6 block");
    assert_eq!(block.prefix_len(), 64);
    assert_eq!(delegated.len(), 2);
    assert_ne!(delegated[0], delegated[1]);
    assert!(
        delegated
            .iter()
            .all(|p| p.prefix_len() == 80 && block.contains_cidr(p)),
        "{delegated:?} should be /80s of {block}"
    );
    assert_eq!(
        described(t, eni_id).await,
        Vec::<Ipv6Cidr>::new(),
        "both were unassigned"
    );

    let kept = t.ec2.assign_ipv6_prefixes(eni_id, 3).await.unwrap();
    t.ec2
        .unassign_ipv6_prefixes(eni_id, &kept[..1])
        .await
        .unwrap();
    let mut left = described(t, eni_id).await;
    left.sort();
    let mut expected = kept[1..].to_vec();
    expected.sort();
    assert_eq!(left, expected);
    // Releasing what the ENI does not hold is refused, and releases nothing.
    let again = t
        .ec2
        .unassign_ipv6_prefixes(eni_id, &[kept[0], kept[1]])
        .await
        .unwrap_err();
    assert_eq!(again.kind, ErrorKind::InvalidParameter, "{again}");
    assert_eq!(described(t, eni_id).await.len(), 2);
    // m5.large: 10 IPv6 addresses per interface, and each /80 counts as one.
    let over = t.ec2.assign_ipv6_prefixes(eni_id, 9).await.unwrap_err();
    assert_eq!(over.kind, ErrorKind::AddressLimitExceeded, "{over}");
    assert_eq!(
        t.ec2.assign_ipv6_prefixes(eni_id, 8).await.unwrap().len(),
        8
    );
    let full = t.ec2.assign_ipv6_prefixes(eni_id, 1).await.unwrap_err();
    assert_eq!(full.kind, ErrorKind::AddressLimitExceeded, "{full}");
    t.ec2
        .unassign_ipv6_prefixes(eni_id, &described(t, eni_id).await)
        .await
        .unwrap();

    let subnet = t
        .ipv4_only_subnet
        .as_ref()
        .expect("strict targets have one");
    let elsewhere = t
        .ec2
        .create_network_interface(&CreateEni {
            subnet_id: subnet.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let no_block = t
        .ec2
        .assign_ipv6_prefixes(&elsewhere.id, 1)
        .await
        .unwrap_err();
    assert_eq!(no_block.kind, ErrorKind::InvalidParameter, "{no_block}");
    assert!(no_block.message.contains("IPv6"), "{no_block}");
    t.ec2.delete_network_interface(&elsewhere.id).await.unwrap();
}

/// A trunk, a branch associated with it under a VLAN id, and their undoing, through the SDK's
/// requests and replies (moto has none of the trunk calls).
async fn trunk_and_branch(t: &Target) {
    let create = |kind: &'static str| CreateEni {
        subnet_id: t.subnet_id.clone(),
        security_groups: vec![SG.into()],
        interface_type: Some(kind),
        ..Default::default()
    };
    let trunk = t
        .ec2
        .create_network_interface(&create("trunk"))
        .await
        .unwrap();
    assert_eq!(trunk.interface_type, InterfaceType::Trunk);
    let taken: Vec<u32> = t
        .ec2
        .describe_instance(&t.instance_id)
        .await
        .unwrap()
        .enis
        .iter()
        .map(|e| e.device_index)
        .collect();
    let device = (1..).find(|d| !taken.contains(d)).unwrap();
    let attachment = t
        .ec2
        .attach_network_interface(&trunk.id, &t.instance_id, device, 0)
        .await
        .unwrap();
    let branch = t
        .ec2
        .create_network_interface(&create("branch"))
        .await
        .unwrap();
    assert_eq!(branch.interface_type, InterfaceType::parse("branch"));
    let association = t
        .ec2
        .associate_trunk_interface(&branch.id, &trunk.id, 7, "conformance-7")
        .await
        .unwrap();
    // A repeat after a lost reply: the same association, not a second one.
    let again = t
        .ec2
        .associate_trunk_interface(&branch.id, &trunk.id, 7, "conformance-7")
        .await
        .unwrap();
    assert_eq!(again, association);
    let listed = t
        .ec2
        .describe_trunk_interface_associations(&trunk.id)
        .await
        .unwrap();
    assert_eq!(
        listed,
        vec![cloud::TrunkAssociation {
            association_id: association.clone(),
            branch_id: branch.id.clone(),
            vlan: 7,
        }]
    );
    let other = t
        .ec2
        .create_network_interface(&create("branch"))
        .await
        .unwrap();
    let taken = t
        .ec2
        .associate_trunk_interface(&other.id, &trunk.id, 7, "conformance-other")
        .await
        .unwrap_err();
    assert_eq!(taken.kind, ErrorKind::InvalidParameter, "{taken}");
    let in_use = t
        .ec2
        .delete_network_interface(&branch.id)
        .await
        .unwrap_err();
    assert_eq!(in_use.kind, ErrorKind::InUse, "{in_use}");

    t.ec2
        .disassociate_trunk_interface(&association)
        .await
        .unwrap();
    // Gone already is done, as for detach and delete.
    t.ec2
        .disassociate_trunk_interface(&association)
        .await
        .unwrap();
    for eni in [&branch.id, &other.id] {
        t.ec2.delete_network_interface(eni).await.unwrap();
    }
    t.ec2.detach_network_interface(&attachment).await.unwrap();
    // Detaching takes EC2 a moment; until then the trunk is in use.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match t.ec2.delete_network_interface(&trunk.id).await {
            Ok(()) => break,
            Err(e) if e.kind == ErrorKind::InUse && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("deleting the detached trunk: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_against_the_simulated_vpc() {
    let mut config = ServeConfig::example();
    config.subnets.push(
        ServeConfig::parse(
            "[vpc]\ncidr = \"10.0.0.0/16\"\n[[subnets]]\nname = \"ipv4-only\"\ncidr = \"10.0.16.0/24\"\naz = \"us-west-2a\"\n",
        )
        .unwrap()
        .subnets
        .remove(0),
    );
    let running = Server::start(&config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let target = Target {
        ec2: AwsEc2::for_endpoint(&running.ec2_url, "us-west-2", Pacing::default()),
        instance_id: running.instances[0].instance_id.clone(),
        subnet_id: running.names.subnets["node-a"].clone(),
        strict: true,
        ipv4_only_subnet: Some(running.names.subnets["ipv4-only"].clone()),
    };
    lifecycle(&target).await;
}

struct Moto(Child);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_moto() -> Option<(Moto, String)> {
    let server = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/moto_server");
    if !server.exists() {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED conformance_against_moto: no {} (scripts/test.sh installs moto[server] in .venv)",
            server.display()
        );
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(server)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let moto = Moto(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "moto_server did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    Some((moto, format!("http://127.0.0.1:{port}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_against_moto() {
    let Some((_moto, endpoint)) = start_moto() else {
        return;
    };
    // moto starts empty: a VPC, a subnet and an instance, made with the plain SDK client.
    let config = aws_sdk_ec2::config::Builder::new()
        .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
        .region(aws_sdk_ec2::config::Region::new("us-west-2"))
        .credentials_provider(aws_sdk_ec2::config::Credentials::new(
            "t", "t", None, None, "static",
        ))
        .endpoint_url(&endpoint)
        .build();
    let client = aws_sdk_ec2::Client::from_conf(config);
    let vpc = client
        .create_vpc()
        .cidr_block("10.0.0.0/16")
        .send()
        .await
        .unwrap();
    let vpc_id = vpc.vpc().unwrap().vpc_id().unwrap().to_string();
    let subnet = client
        .create_subnet()
        .vpc_id(&vpc_id)
        .cidr_block("10.0.0.0/20")
        .availability_zone("us-west-2a")
        .send()
        .await
        .unwrap();
    let subnet_id = subnet.subnet().unwrap().subnet_id().unwrap().to_string();
    let images = client.describe_images().send().await.unwrap();
    let image = images.images()[0].image_id().unwrap().to_string();
    let run = client
        .run_instances()
        .image_id(image)
        .instance_type(aws_sdk_ec2::types::InstanceType::M5Large)
        .subnet_id(&subnet_id)
        .min_count(1)
        .max_count(1)
        .send()
        .await
        .unwrap();
    let instance_id = run.instances()[0].instance_id().unwrap().to_string();
    let target = Target {
        ec2: AwsEc2::for_endpoint(&endpoint, "us-west-2", Pacing::default()),
        instance_id,
        subnet_id,
        strict: false,
        ipv4_only_subnet: None,
    };
    lifecycle(&target).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tight_account_bucket_slows_creation_but_each_eni_is_made_once() {
    let mut config = ServeConfig::example();
    config.ec2.mutating_bucket = (2.0, 4.0);
    let running = Server::start(&config, "127.0.0.1:0".parse().unwrap()).unwrap();
    // The node's own bucket is generous here, so that EC2's throttling is what paces the calls.
    let pacing = Pacing {
        mutating: (100.0, 100.0),
        backoff_base: Duration::from_millis(50),
        ..Pacing::default()
    };
    let ec2 = std::sync::Arc::new(AwsEc2::for_endpoint(&running.ec2_url, "us-west-2", pacing));
    let subnet = running.names.subnets["node-a"].clone();
    const ENIS: usize = 8;
    let creations: Vec<_> = (0..ENIS)
        .map(|i| {
            let ec2 = ec2.clone();
            let subnet = subnet.clone();
            tokio::spawn(async move {
                ec2.create_network_interface(&CreateEni {
                    subnet_id: subnet,
                    tags: vec![tag("batch", "throttled"), tag("n", &i.to_string())],
                    ..Default::default()
                })
                .await
            })
        })
        .collect();
    for creation in creations {
        creation.await.unwrap().unwrap();
    }
    let stats = ec2.stats()["CreateNetworkInterface"];
    assert_eq!(stats.ok, ENIS as u64);
    assert_eq!(stats.failed, 0);
    assert!(
        stats.throttled > 0,
        "the bucket should have throttled: {stats:?}"
    );
    let made = ec2
        .describe_network_interfaces(&EniQuery {
            filters: vec![("tag:batch".into(), vec!["throttled".into()])],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(made.len(), ENIS, "every creation happened exactly once");
}
