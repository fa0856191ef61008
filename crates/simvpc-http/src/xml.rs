//! EC2's reply documents, written with quick-xml (elements, escaping, the declaration); this module
//! only gives them EC2's shapes: a leaf, a node, a list of `item`s, the response and error documents.

use quick_xml::events::{BytesDecl, BytesEnd, BytesStart, BytesText, Event};
use quick_xml::Writer;

pub const NAMESPACE: &str = "http://ec2.amazonaws.com/doc/2016-11-15/";

pub struct Xml(Writer<Vec<u8>>);

impl Default for Xml {
    fn default() -> Xml {
        Xml(Writer::new(Vec::new()))
    }
}

/// Writing to memory cannot fail.
fn written(result: std::io::Result<()>) {
    result.expect("writing XML to memory");
}

impl Xml {
    pub fn new() -> Xml {
        Xml::default()
    }

    /// `<name>text</name>`, escaped.
    pub fn leaf(&mut self, name: &str, text: impl std::fmt::Display) -> &mut Self {
        let text = text.to_string();
        written(
            self.0
                .create_element(name)
                .write_text_content(BytesText::new(&text))
                .map(|_| ()),
        );
        self
    }

    /// `<name>...</name>` around what `inner` writes.
    pub fn node(&mut self, name: &str, inner: impl FnOnce(&mut Xml)) -> &mut Self {
        written(self.0.write_event(Event::Start(BytesStart::new(name))));
        inner(self);
        written(self.0.write_event(Event::End(BytesEnd::new(name))));
        self
    }

    /// `<name><item>...</item>...</name>`, EC2's list shape.
    pub fn items<T>(
        &mut self,
        name: &str,
        items: impl IntoIterator<Item = T>,
        mut each: impl FnMut(&mut Xml, T),
    ) -> &mut Self {
        self.node(name, |x| {
            for item in items {
                x.node("item", |x| each(x, item));
            }
        })
    }

    /// `<name><item>text</item>...</name>`, EC2's list of plain strings.
    pub fn strings(
        &mut self,
        name: &str,
        items: impl IntoIterator<Item = impl std::fmt::Display>,
    ) -> &mut Self {
        self.node(name, |x| {
            for item in items {
                x.leaf("item", item);
            }
        })
    }

    /// The whole reply document for `action`, with a request id.
    pub fn response(action: &str, request_id: &str, body: Xml) -> String {
        let mut doc = Xml::document();
        let element = format!("{action}Response");
        let start = BytesStart::new(element.as_str()).with_attributes([("xmlns", NAMESPACE)]);
        written(doc.0.write_event(Event::Start(start)));
        doc.leaf("requestId", request_id);
        doc.0.get_mut().extend_from_slice(&body.0.into_inner());
        written(
            doc.0
                .write_event(Event::End(BytesEnd::new(element.as_str()))),
        );
        doc.text()
    }

    /// EC2's error document.
    pub fn error(code: &str, message: &str, request_id: &str) -> String {
        let mut doc = Xml::document();
        doc.node("Response", |x| {
            x.node("Errors", |x| {
                x.node("Error", |x| {
                    x.leaf("Code", code).leaf("Message", message);
                });
            })
            .leaf("RequestID", request_id);
        });
        doc.text()
    }

    fn document() -> Xml {
        let mut doc = Xml::new();
        written(
            doc.0
                .write_event(Event::Decl(BytesDecl::new("1.0", Some("UTF-8"), None))),
        );
        doc.0.get_mut().push(b'\n');
        doc
    }

    fn text(self) -> String {
        String::from_utf8(self.0.into_inner()).expect("XML written from strings is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_and_documents_have_ec2s_shape() {
        let mut body = Xml::new();
        body.leaf("description", "a <b> & \"c\"")
            .strings("groupSet", ["sg-1", "sg-2"]);
        let doc = Xml::response("CreateNetworkInterface", "r-1", body);
        assert_eq!(
            doc,
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<CreateNetworkInterfaceResponse xmlns=\"{NAMESPACE}\"><requestId>r-1</requestId><description>a &lt;b&gt; &amp; &quot;c&quot;</description><groupSet><item>sg-1</item><item>sg-2</item></groupSet></CreateNetworkInterfaceResponse>"
            )
        );
        assert_eq!(
            Xml::error("InvalidParameterValue", "x < y", "r-2"),
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>InvalidParameterValue</Code><Message>x &lt; y</Message></Error></Errors><RequestID>r-2</RequestID></Response>"
        );
    }
}
