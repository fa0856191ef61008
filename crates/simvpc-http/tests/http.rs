//! The HTTP front, driven by boto3 (AWS's own SDK for Python, from the test venv) and by plain HTTP
//! for IMDSv2 and error documents.

use simvpc_http::{ServeConfig, Server};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;

fn venv_python() -> Option<PathBuf> {
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    let has_boto3 = Command::new(&python)
        .args(["-c", "import boto3"])
        .output()
        .is_ok_and(|o| o.status.success());
    has_boto3.then_some(python)
}

/// A raw HTTP/1.0 exchange: (status, headers, body).
fn http(
    url: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, String) {
    let address = url.trim_start_matches("http://");
    let mut stream = TcpStream::connect(address).unwrap();
    let mut request = format!(
        "{method} {path} HTTP/1.0\r\nHost: {address}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_string(), body.to_string())
}

#[test]
fn boto3_runs_an_eni_lifecycle() {
    let Some(python) = venv_python() else {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED boto3_runs_an_eni_lifecycle: no .venv with boto3 (scripts/test.sh creates it)"
        );
        return;
    };
    let running = Server::start(&ServeConfig::example(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let instance = &running.instances[0].instance_id;
    let subnet = &running.names.subnets["node-a"];
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/boto3_lifecycle.py");
    let output = Command::new(python)
        .arg(script)
        .args([&running.ec2_url, instance, subnet])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "boto3 lifecycle failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn boto3_runs_trunk_and_branch_associations() {
    let Some(python) = venv_python() else {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED boto3_runs_trunk_and_branch_associations: no .venv with boto3 (scripts/test.sh creates it)"
        );
        return;
    };
    let config = ServeConfig::parse(
        r#"
[vpc]
cidr = "10.0.0.0/16"

[[subnets]]
name = "node-a"
cidr = "10.0.0.0/20"
az = "us-west-2a"

[[subnets]]
name = "other"
cidr = "10.0.16.0/20"
az = "us-west-2a"

[[instances]]
name = "node-1"
type = "m5.large"
subnet = "node-a"
"#,
    )
    .unwrap();
    // The script makes more mutating calls in a second than the account's default bucket (50,
    // then 5 a second) holds, and boto3 retries a throttled call twice with a random backoff:
    // whether it got through was luck (it failed once in the suite). The trunk's rules are under
    // test here; throttling is a_tight_bucket_answers_request_limit_exceeded's.
    let mut config = config;
    config.ec2.mutating_bucket = (1000.0, 1000.0);
    let running = Server::start(&config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/boto3_trunk.py");
    let output = Command::new(python)
        .arg(script)
        .args([
            &running.ec2_url,
            &running.instances[0].instance_id,
            &running.names.subnets["node-a"],
            &running.names.subnets["other"],
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "boto3 trunk failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn errors_are_ec2_error_documents() {
    let running = Server::start(&ServeConfig::example(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let (status, _, body) = http(
        &running.ec2_url,
        "POST",
        "/",
        &form,
        "Action=Frobnicate&Version=2016-11-15",
    );
    assert_eq!(status, 400);
    assert!(body.contains("<Code>InvalidAction</Code>"), "{body}");
    assert!(body.contains("<RequestID>"), "{body}");
    let (status, _, body) = http(
        &running.ec2_url,
        "POST",
        "/",
        &form,
        "Action=DeleteNetworkInterface",
    );
    assert_eq!(status, 400);
    assert!(body.contains("<Code>MissingParameter</Code>"), "{body}");
    let (status, _, body) = http(
        &running.ec2_url,
        "POST",
        "/",
        &form,
        "Action=DescribeNetworkInterfaces&NetworkInterfaceId.1=eni-0000",
    );
    assert_eq!(status, 400);
    assert!(
        body.contains("InvalidNetworkInterfaceID.NotFound"),
        "{body}"
    );
}

#[test]
fn a_tight_bucket_answers_request_limit_exceeded() {
    let mut config = ServeConfig::example();
    config.ec2.non_mutating_bucket = (2.0, 0.001);
    let running = Server::start(&config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let form = [("Content-Type", "application/x-www-form-urlencoded")];
    let statuses: Vec<u16> = (0..4)
        .map(|_| {
            http(
                &running.ec2_url,
                "POST",
                "/",
                &form,
                "Action=DescribeSubnets",
            )
            .0
        })
        .collect();
    assert_eq!(statuses, [200, 200, 503, 503]);
    let (_, _, body) = http(
        &running.ec2_url,
        "POST",
        "/",
        &form,
        "Action=DescribeSubnets",
    );
    assert!(body.contains("<Code>RequestLimitExceeded</Code>"), "{body}");
}

#[test]
fn imds_v2_needs_a_token_and_shows_each_interface() {
    let running = Server::start(&ServeConfig::example(), "127.0.0.1:0".parse().unwrap()).unwrap();
    let node = &running.instances[0];
    let imds = &node.imds_url;
    let (status, _, _) = http(imds, "GET", "/latest/meta-data/instance-id", &[], "");
    assert_eq!(status, 401, "IMDSv1 is refused");
    let (status, _, _) = http(imds, "PUT", "/latest/api/token", &[], "");
    assert_eq!(status, 400, "a token needs a TTL");
    let (status, head, token) = http(
        imds,
        "PUT",
        "/latest/api/token",
        &[("X-aws-ec2-metadata-token-ttl-seconds", "21600")],
        "",
    );
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("x-aws-ec2-metadata-token-ttl-seconds: 21600"),
        "the SDK refuses a token reply without its TTL: {head}"
    );
    let get = |path: &str| {
        http(
            imds,
            "GET",
            path,
            &[("X-aws-ec2-metadata-token", &token)],
            "",
        )
        .2
    };
    assert_eq!(get("/latest/meta-data/instance-id"), node.instance_id);
    assert_eq!(get("/latest/meta-data/instance-type"), "m5.large");
    assert_eq!(get("/latest/meta-data/placement/region"), "us-west-2");
    let mac = get("/latest/meta-data/mac");
    assert_eq!(
        get("/latest/meta-data/network/interfaces/macs/"),
        format!("{mac}/")
    );
    assert_eq!(
        get(&format!(
            "/latest/meta-data/network/interfaces/macs/{mac}/device-number"
        )),
        "0"
    );
    assert_eq!(
        get(&format!(
            "/latest/meta-data/network/interfaces/macs/{mac}/vpc-ipv4-cidr-blocks"
        )),
        "10.0.0.0/16"
    );
    let local = get("/latest/meta-data/local-ipv4");
    assert!(local.starts_with("10.0."), "{local}");
    let interface = |key: &str| {
        get(&format!(
            "/latest/meta-data/network/interfaces/macs/{mac}/{key}"
        ))
    };
    assert_eq!(
        interface("subnet-ipv6-cidr-blocks"),
        "2600:1f14:abc:de00::/64"
    );
    assert_eq!(interface("vpc-ipv6-cidr-blocks"), "2600:1f14:abc:de00::/56");
    assert_eq!(interface("ipv6-prefix"), "", "nothing delegated yet");
    assert!(interface("").lines().any(|k| k == "ipv6-prefix"));
    // A /80 delegated through EC2 shows in the metadata at once.
    let (status, _, body) = http(
        &running.ec2_url,
        "POST",
        "/",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        &format!(
            "Action=AssignIpv6Addresses&NetworkInterfaceId={}&Ipv6PrefixCount=1",
            interface("interface-id")
        ),
    );
    assert_eq!(status, 200, "{body}");
    let delegated = interface("ipv6-prefix");
    assert!(
        delegated.starts_with("2600:1f14:abc:de00:") && delegated.ends_with("/80"),
        "{delegated}"
    );
    assert!(
        body.contains(&format!("<item>{delegated}</item>")),
        "{body}"
    );
}
