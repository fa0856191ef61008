//! Just enough XML writing for EC2's replies.

use std::fmt::Write;

pub const NAMESPACE: &str = "http://ec2.amazonaws.com/doc/2016-11-15/";

#[derive(Default)]
pub struct Xml(String);

impl Xml {
    pub fn new() -> Xml {
        Xml::default()
    }

    /// `<name>text</name>`, escaped.
    pub fn leaf(&mut self, name: &str, text: impl std::fmt::Display) -> &mut Self {
        let text = text.to_string();
        let _ = write!(self.0, "<{name}>{}</{name}>", escape(&text));
        self
    }

    /// `<name>...</name>` around what `inner` writes.
    pub fn node(&mut self, name: &str, inner: impl FnOnce(&mut Xml)) -> &mut Self {
        let _ = write!(self.0, "<{name}>");
        inner(self);
        let _ = write!(self.0, "</{name}>");
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
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<{action}Response xmlns=\"{NAMESPACE}\"><requestId>{request_id}</requestId>{}</{action}Response>",
            body.0
        )
    }

    /// EC2's error document.
    pub fn error(code: &str, message: &str, request_id: &str) -> String {
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{}</Code><Message>{}</Message></Error></Errors><RequestID>{request_id}</RequestID></Response>",
            escape(code),
            escape(message)
        )
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
