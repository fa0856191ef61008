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
}
