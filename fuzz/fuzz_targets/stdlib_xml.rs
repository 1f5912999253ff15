//! `pmnc.xml.decode` input. Properties: bounded allocation; what decodes writes back as XML that
//! decodes to the same tree (text compared with adjacent pieces joined); a refusal names the
//! function; nothing deeper than the depth limit is ever returned.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustomnic_fuzz::bounded;
use rustomnic_stdlib::xml::{decode, Element, Node, DEFAULT_LIMITS};

/// The tree with adjacent text joined and whitespace-only text dropped (what a reading of
/// written text gives).
fn settled(e: &Element) -> Element {
    let mut children: Vec<Node> = Vec::new();
    for c in &e.children {
        match c {
            Node::Text(t) => match children.last_mut() {
                Some(Node::Text(prev)) => prev.push_str(t),
                _ => children.push(Node::Text(t.clone())),
            },
            Node::Element(child) => children.push(Node::Element(settled(child))),
        }
    }
    children.retain(|c| !matches!(c, Node::Text(t) if t.chars().all(char::is_whitespace)));
    Element { children, ..e.clone() }
}

fn depth(e: &Element) -> usize {
    1 + e.children.iter().map(|c| if let Node::Element(c) = c { depth(c) } else { 0 }).max().unwrap_or(0)
}

fuzz_target!(|data: &[u8]| {
    let parsed = bounded("xml decode", data.len(), || decode(data, DEFAULT_LIMITS));
    let root = match parsed {
        Ok(root) => root,
        Err(e) => {
            assert!(e.starts_with("pmnc.xml.decode: "), "{e}");
            return;
        }
    };
    assert!(depth(&root) <= DEFAULT_LIMITS.max_depth);
    let text = root.to_xml();
    let again = decode(text.as_bytes(), DEFAULT_LIMITS).unwrap_or_else(|e| panic!("our own XML does not read back: {e}\n{text}"));
    assert_eq!(settled(&again), settled(&root), "{text}");
});
