//! EC2 Query parameters: `application/x-www-form-urlencoded` pairs with numbered members
//! (`NetworkInterfaceId.1`, `Filter.1.Name`, `Filter.1.Value.1`, `Tag.1.Key`).

use simvpc::Ec2Error;
use std::collections::BTreeMap;

pub struct Params(BTreeMap<String, String>);

pub const MISSING_PARAMETER: &str = "MissingParameter";

impl Params {
    pub fn parse(body: &str) -> Params {
        Params(
            body.split('&')
                .filter(|p| !p.is_empty())
                .map(|pair| {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    (decode(k), decode(v))
                })
                .collect(),
        )
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    pub fn required(&self, name: &str) -> Result<&str, Ec2Error> {
        self.get(name).ok_or_else(|| Ec2Error {
            code: MISSING_PARAMETER,
            message: format!("The request must contain the parameter {name}").into(),
        })
    }

    pub fn number(&self, name: &str) -> Result<Option<u32>, Ec2Error> {
        self.get(name)
            .map(|v| {
                v.parse().map_err(|_| Ec2Error {
                    code: simvpc::codes::INVALID_PARAMETER,
                    message: format!("Value ({v}) for parameter {name} is invalid").into(),
                })
            })
            .transpose()
    }

    pub fn flag(&self, name: &str) -> Option<bool> {
        self.get(name).map(|v| v.eq_ignore_ascii_case("true"))
    }

    /// `prefix.1`, `prefix.2`, ... in member order.
    pub fn list(&self, prefix: &str) -> Vec<String> {
        self.members(prefix)
            .into_iter()
            .filter_map(|n| self.get(&format!("{prefix}.{n}")).map(str::to_string))
            .collect()
    }

    /// The member numbers under `prefix` (`prefix.<n>` or `prefix.<n>.<rest>`), sorted.
    fn members(&self, prefix: &str) -> Vec<u32> {
        let head = format!("{prefix}.");
        let mut numbers: Vec<u32> = self
            .0
            .keys()
            .filter_map(|k| k.strip_prefix(&head)?.split('.').next()?.parse().ok())
            .collect();
        numbers.sort_unstable();
        numbers.dedup();
        numbers
    }

    pub fn filters(&self) -> Vec<(String, Vec<String>)> {
        self.members("Filter")
            .into_iter()
            .filter_map(|n| {
                let name = self.get(&format!("Filter.{n}.Name"))?.to_string();
                Some((name, self.list(&format!("Filter.{n}.Value"))))
            })
            .collect()
    }

    /// `prefix.N.Key` / `prefix.N.Value` pairs.
    pub fn tags(&self, prefix: &str) -> Vec<(String, String)> {
        self.members(prefix)
            .into_iter()
            .filter_map(|n| {
                let key = self.get(&format!("{prefix}.{n}.Key"))?.to_string();
                let value = self
                    .get(&format!("{prefix}.{n}.Value"))
                    .unwrap_or_default()
                    .to_string();
                Some((key, value))
            })
            .collect()
    }

    /// Tags of every `TagSpecification.N` (EC2 applies them to the resource being created).
    pub fn tag_specifications(&self) -> Vec<(String, String)> {
        self.members("TagSpecification")
            .into_iter()
            .flat_map(|n| self.tags(&format!("TagSpecification.{n}.Tag")))
            .collect()
    }
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'+', _, _) => out.push(b' '),
            (b'%', Some(high), Some(low)) => {
                out.push(high << 4 | low);
                i += 2;
            }
            (b, _, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_filters_and_tags() {
        let p = Params::parse(
            "Action=DescribeNetworkInterfaces&Filter.2.Name=status&Filter.2.Value.1=available\
             &Filter.1.Name=tag%3Acluster.k8s.amazonaws.com%2Fname&Filter.1.Value.1=my+cluster\
             &NetworkInterfaceId.2=eni-b&NetworkInterfaceId.1=eni-a&Tag.1.Key=k&Tag.1.Value=v",
        );
        assert_eq!(p.list("NetworkInterfaceId"), ["eni-a", "eni-b"]);
        assert_eq!(
            p.filters(),
            vec![
                (
                    "tag:cluster.k8s.amazonaws.com/name".to_string(),
                    vec!["my cluster".to_string()]
                ),
                ("status".to_string(), vec!["available".to_string()]),
            ]
        );
        assert_eq!(p.tags("Tag"), vec![("k".to_string(), "v".to_string())]);
        assert!(p.required("InstanceId").is_err());
    }

    #[test]
    fn percent_decoding_edges() {
        assert_eq!(decode("a%2Fb"), "a/b");
        assert_eq!(decode("100%"), "100%");
        assert_eq!(decode("%zz"), "%zz");
    }
}
