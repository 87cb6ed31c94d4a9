//! Tensor names: plain UTF-8 strings, or structured paths stored as RS (0x1E) + a compact,
//! ASCII-only JSON array, exactly as Python's `json.dumps(path, separators=(",", ":"))` writes it.
use std::collections::HashMap;

use crate::error::{Error, Result};

pub const RECORD_SEPARATOR: u8 = 0x1E;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PathComponent {
    Str(String),
    Int(u64),
}

pub type TensorPath = Vec<PathComponent>;

/// Decode stored name bytes into a path (a plain name is a one-element path).
pub fn decode(name: &[u8]) -> Result<TensorPath> {
    let shown = || String::from_utf8_lossy(name).into_owned();
    if name.is_empty() {
        return Err(Error::format("Invalid empty tensor path"));
    }
    if name[0] != RECORD_SEPARATOR {
        let s = std::str::from_utf8(name)
            .map_err(|_| Error::format(format!("tensor name {:?} is not valid UTF-8", shown())))?;
        return Ok(vec![PathComponent::Str(s.to_string())]);
    }
    let body = &name[1..];
    let bad = |why: &str| Error::format(format!("invalid structured tensor path {:?}: {why}", shown()));
    if body.first() != Some(&b'[') || body.last() != Some(&b']') || body.iter().any(|&b| b == b'\n' || b == b'\r') {
        return Err(bad("must be a one-line JSON array"));
    }
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| bad(&e.to_string()))?;
    let items = value.as_array().ok_or_else(|| bad("not a JSON array"))?;
    if items.is_empty() {
        return Err(bad("empty path"));
    }
    items
        .iter()
        .map(|v| match v {
            serde_json::Value::String(s) => Ok(PathComponent::Str(s.clone())),
            serde_json::Value::Number(n) => {
                n.as_u64().map(PathComponent::Int).ok_or_else(|| bad("path indices must be integers >= 0"))
            }
            _ => Err(bad("path components must be strings or integers")),
        })
        .collect()
}

/// Encode a path the way CoreWeave's writer does: one string stays plain, anything else is
/// RS + JSON. Fails on paths the reader would refuse (empty, or a plain name starting with RS).
pub fn encode(path: &[PathComponent]) -> Result<Vec<u8>> {
    match path {
        [] => Err(Error::value("Invalid empty tensor path")),
        [PathComponent::Str(s)] => {
            if s.is_empty() {
                return Err(Error::value("Invalid empty tensor path"));
            }
            if s.as_bytes()[0] == RECORD_SEPARATOR {
                return Err(Error::value(format!("tensor name {s:?} may not start with the 0x1E separator")));
            }
            Ok(s.as_bytes().to_vec())
        }
        _ => {
            let mut out = vec![RECORD_SEPARATOR, b'['];
            for (i, c) in path.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                match c {
                    PathComponent::Int(n) => out.extend_from_slice(n.to_string().as_bytes()),
                    PathComponent::Str(s) => json_ascii_string(s, &mut out),
                }
            }
            out.push(b']');
            Ok(out)
        }
    }
}

/// Python's `json.dumps(s, ensure_ascii=True)`: anything outside space..'~' is escaped, astral
/// characters as surrogate pairs, hex in lower case.
fn json_ascii_string(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    for ch in s.chars() {
        match ch {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            '\u{8}' => out.extend_from_slice(b"\\b"),
            '\u{c}' => out.extend_from_slice(b"\\f"),
            ' '..='~' => out.push(ch as u8),
            _ => {
                let mut units = [0u16; 2];
                for u in ch.encode_utf16(&mut units) {
                    out.extend_from_slice(format!("\\u{u:04x}").as_bytes());
                }
            }
        }
    }
    out.push(b'"');
}

pub fn display(path: &[PathComponent]) -> String {
    match path {
        [PathComponent::Str(s)] => s.clone(),
        _ => path
            .iter()
            .map(|c| match c {
                PathComponent::Str(s) => s.clone(),
                PathComponent::Int(i) => i.to_string(),
            })
            .collect::<Vec<_>>()
            .join("."),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Node {
    Leaf,
    /// `int_keys` is set by the first child: every child of a level has the same key kind.
    Branch {
        int_keys: Option<bool>,
    },
}

/// The prefix-tree checks both CoreWeave's writer and reader apply: no duplicate paths, no
/// path that is both a leaf and a prefix of another, no str and int keys at one level.
///
/// A trie of numbered nodes: each path component is stored once, under its parent's number, so
/// the work and memory of registering a path are linear in its length (a map of whole prefixes
/// would hold every prefix of a 32,000-component path: quadratic).
pub struct PathRegistry {
    /// Node 0 is the root.
    nodes: Vec<Node>,
    children: HashMap<(u32, PathComponent), u32>,
}

impl Default for PathRegistry {
    fn default() -> Self {
        PathRegistry { nodes: vec![Node::Branch { int_keys: None }], children: HashMap::new() }
    }
}

impl PathRegistry {
    pub fn register(&mut self, path: &[PathComponent]) -> Result<()> {
        let conflict = |why: &str| Error::format(format!("Conflicting tensor paths: {:?} {why}", display(path)));
        if path.is_empty() {
            return Err(Error::format("Invalid empty tensor path"));
        }
        let mut cur = 0u32;
        for (depth, c) in path.iter().enumerate() {
            let int_keys = matches!(c, PathComponent::Int(_));
            match &mut self.nodes[cur as usize] {
                Node::Leaf => return Err(conflict("extends a path that is already a tensor")),
                Node::Branch { int_keys: Some(k) } if *k != int_keys => {
                    return Err(conflict("mixes string and integer keys at one level"))
                }
                Node::Branch { int_keys: k } => *k = Some(int_keys),
            }
            let last = depth + 1 == path.len();
            let key = (cur, c.clone());
            match self.children.get(&key) {
                Some(&child) if last => {
                    return Err(match self.nodes[child as usize] {
                        Node::Leaf => conflict("appears twice"),
                        Node::Branch { .. } => conflict("is a prefix of another tensor path"),
                    })
                }
                Some(&child) => cur = child,
                None => {
                    let id = u32::try_from(self.nodes.len())
                        .map_err(|_| Error::format("too many distinct tensor path components"))?;
                    self.nodes.push(if last { Node::Leaf } else { Node::Branch { int_keys: None } });
                    self.children.insert(key, id);
                    cur = id;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PathComponent::*;

    #[test]
    fn encodes_like_python_json() {
        let p = vec![Str("model".into()), Str("layers".into()), Int(0), Str("w".into())];
        assert_eq!(encode(&p).unwrap(), b"\x1e[\"model\",\"layers\",0,\"w\"]");
        let u = vec![Str("é😀\"\x7f".into()), Int(3)];
        assert_eq!(encode(&u).unwrap(), b"\x1e[\"\\u00e9\\ud83d\\ude00\\\"\\u007f\",3]".to_vec());
        assert_eq!(decode(&encode(&u).unwrap()).unwrap(), u);
        assert_eq!(decode(b"plain.name").unwrap(), vec![Str("plain.name".into())]);
        assert!(decode(b"").is_err());
        assert!(decode(b"\x1e[1.5]").is_err());
        assert!(decode(b"\x1e[-1]").is_err());
        assert!(decode(b"\x1e{\"a\":1}").is_err());
    }

    #[test]
    fn registry_rejects_conflicts() {
        let mut r = PathRegistry::default();
        r.register(&[Str("a".into()), Int(0)]).unwrap();
        r.register(&[Str("a".into()), Int(1)]).unwrap();
        assert!(r.register(&[Str("a".into()), Int(1)]).is_err());
        assert!(r.register(&[Str("a".into())]).is_err());
        assert!(r.register(&[Str("a".into()), Str("x".into())]).is_err());
        assert!(r.register(&[Str("a".into()), Int(0), Str("deeper".into())]).is_err());
        assert!(r.register(&[Int(0)]).is_err());
        assert!(r.register(&[]).is_err());
        r.register(&[Str("b".into())]).unwrap();
        assert!(r.register(&[Str("b".into())]).unwrap_err().message.contains("appears twice"));
        r.register(&[Str("c".into()), Str("d".into())]).unwrap();
        assert!(r.register(&[Str("c".into())]).unwrap_err().message.contains("prefix of another"));
    }

    #[test]
    fn deep_paths_cost_linear_memory() {
        // 32,000 components: a map of whole prefixes would hold ~512 million components.
        let mut r = PathRegistry::default();
        let deep = vec![Int(0); 32_000];
        r.register(&deep).unwrap();
        assert_eq!(r.nodes.len(), 32_001);
        assert!(r.register(&deep).is_err());
        let mut other = deep.clone();
        other[31_999] = Int(1);
        r.register(&other).unwrap();
        assert_eq!(r.nodes.len(), 32_002);
        assert!(r.register(&deep[..100]).unwrap_err().message.contains("prefix of another"));
    }
}
