use testbed::*;

#[test]
fn smoke() {
    let mut bins = Binaries::locate().unwrap();
    bins.ipamd = env!("CARGO_BIN_EXE_vpc-ipamd").into();
    let mut tb = Testbed::start(&Options::default(), bins).unwrap();
    let took = tb.start_daemon(0).unwrap();
    eprintln!("ready after {took:?}");
    eprintln!("{}", tb.nodes[0].introspect("/v1/status").unwrap());
    let a = tb.add_pod(0).unwrap();
    let b = tb.add_pod(0).unwrap();
    eprintln!("{} {}", a.ip, b.ip);
    let _who = b
        .netns
        .run(|| probe::WhoAmI::bind((b.ip, 7000).into()).unwrap())
        .unwrap();
    eprintln!("{:?}", tb.seen_as(&a.netns, b.ip, 7000));
    tb.del_pod(a).unwrap();
    eprintln!("{}", tb.nodes[0].log_tail(40));
}
