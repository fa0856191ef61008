//! The IMDSv2 identity through the SDK's own IMDS client, against the simulated VPC's per-instance
//! listener: proof that the token exchange and the metadata tree are what the SDK expects.

use cloud::aws::AwsEc2;
use cloud::identity::{self, Identity};
use cloud::throttle::Pacing;
use cloud::{CreateEni, Ec2};
use simvpc_http::{ServeConfig, Server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_from_imds_follows_attachments() {
    let running = Server::start(&ServeConfig::example(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let node = &running.instances[0];
    let imds = identity::client(Some(&node.imds_url)).unwrap();
    let before = Identity::fetch(&imds).await.unwrap();
    assert_eq!(before.instance_id, node.instance_id);
    assert_eq!(before.instance_type, "m5.large");
    assert_eq!(before.availability_zone, "us-west-2a");
    assert_eq!(before.region, "us-west-2");
    assert_eq!(before.vpc_cidrs.len(), 1);
    assert_eq!(before.enis.len(), 1);
    assert_eq!(before.enis[0].device_number, 0);
    assert_eq!(before.enis[0].eni_id, before.primary_eni);

    let ec2 = AwsEc2::for_endpoint(&running.ec2_url, "us-west-2", Pacing::default());
    let eni = ec2
        .create_network_interface(&CreateEni {
            subnet_id: running.names.subnets["node-a"].clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    ec2.attach_network_interface(&eni.id, &node.instance_id, 2, 0)
        .await
        .unwrap();
    let after = Identity::fetch(&imds).await.unwrap();
    let attached = after
        .enis
        .iter()
        .find(|e| e.eni_id == eni.id)
        .expect("new ENI listed");
    assert_eq!(attached.device_number, 2);
    assert_eq!(attached.mac, eni.mac);
    assert_eq!(attached.addresses, [eni.primary_ip.unwrap()]);
    assert!(attached.blocks().is_empty());

    // The periodic read sees addresses and prefixes as EC2 hands them out, counting its requests.
    let ips = ec2.assign_private_ips(&eni.id, 2).await.unwrap();
    let prefixes = ec2.assign_prefixes(&before.primary_eni, 1).await.unwrap();
    let network = identity::network(&imds, &before.primary_mac).await.unwrap();
    let by_id = |id: &str| network.enis.iter().find(|e| e.eni_id == id).unwrap();
    let mut blocks = by_id(&eni.id).blocks();
    blocks.sort();
    let mut expected: Vec<_> = ips.iter().map(|ip| ipam::Ipv4Cidr::host(*ip)).collect();
    expected.sort();
    assert_eq!(blocks, expected);
    assert_eq!(by_id(&before.primary_eni).blocks(), prefixes);
    assert_eq!(network.vpc_cidrs, before.vpc_cidrs);
    assert_eq!(network.reads, 1 + 5 * 2 + 1, "{network:?}");
}
