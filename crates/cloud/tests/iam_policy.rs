//! deploy/iam-policy.json grants exactly the EC2 actions the AWS backend calls: a call the policy
//! lacks fails on a real node with UnauthorizedOperation, a grant nobody uses is privilege to spare.

use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// Every operation the backend sends: the first argument of each `call(` in aws.rs, where all EC2
/// requests go through the pacer.
fn called_operations() -> BTreeSet<String> {
    let source = std::fs::read_to_string(root().join("crates/cloud/src/aws.rs")).unwrap();
    let mut found = BTreeSet::new();
    for (at, _) in source.match_indices("call(") {
        let rest = source[at + "call(".len()..].trim_start();
        if let Some(literal) = rest.strip_prefix('"') {
            let name = &literal[..literal.find('"').unwrap()];
            found.insert(name.to_string());
        }
    }
    found
}

fn statements(policy: &Value) -> Vec<&Value> {
    match &policy["Statement"] {
        Value::Array(all) => all.iter().collect(),
        one => vec![one],
    }
}

fn actions(statement: &Value) -> Vec<String> {
    match &statement["Action"] {
        Value::String(one) => vec![one.clone()],
        Value::Array(all) => all
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect(),
        other => panic!("Action {other} is neither a string nor a list"),
    }
}

#[test]
fn the_policy_grants_exactly_what_the_backend_calls() {
    let policy: Value =
        serde_json::from_slice(&std::fs::read(root().join("deploy/iam-policy.json")).unwrap())
            .unwrap();
    let granted: BTreeSet<String> = statements(&policy)
        .iter()
        .filter(|s| s["Effect"] == "Allow")
        .flat_map(|s| actions(s))
        .map(|a| {
            a.strip_prefix("ec2:")
                .unwrap_or_else(|| panic!("{a}: only EC2 actions belong in this policy"))
                .to_string()
        })
        .collect();
    let called = called_operations();
    assert!(
        called.len() >= 10,
        "the scan found too few operations: {called:?}"
    );
    let missing: Vec<_> = called.difference(&granted).collect();
    let unused: Vec<_> = granted.difference(&called).collect();
    assert!(missing.is_empty(), "called but not granted: {missing:?}");
    assert!(unused.is_empty(), "granted but never called: {unused:?}");
}

#[test]
fn create_tags_is_only_granted_under_a_tag_condition() {
    let policy: Value =
        serde_json::from_slice(&std::fs::read(root().join("deploy/iam-policy.json")).unwrap())
            .unwrap();
    let tagging: Vec<&Value> = statements(&policy)
        .into_iter()
        .filter(|s| actions(s).iter().any(|a| a == "ec2:CreateTags"))
        .collect();
    assert!(!tagging.is_empty());
    for statement in tagging {
        assert_eq!(actions(statement), ["ec2:CreateTags"], "{statement}");
        assert!(
            statement["Condition"].is_object(),
            "CreateTags without a condition: {statement}"
        );
        assert_ne!(statement["Resource"], "*", "{statement}");
    }
}
