//! File names as text, losslessly: the store records raw files by their
//! path relative to the dataset, and a name need not be UTF-8 on Linux.
//! Bytes that are not UTF-8 (and `%` itself) are written as `%XX`, so the
//! text turns back into the very same path.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// `path` as text that `decode` turns back into it.
pub fn encode(path: &Path) -> String {
    let bytes = path.as_os_str().as_bytes();
    let mut out = String::with_capacity(bytes.len());
    encode_into(&mut out, bytes);
    out
}

/// `encode` of `bytes`, appended to `out` (no allocation for a plain name).
pub fn encode_into(out: &mut String, bytes: &[u8]) {
    let mut rest = bytes;
    while !rest.is_empty() {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                push_escaped(out, s);
                break;
            }
            Err(e) => {
                let (good, bad) = rest.split_at(e.valid_up_to());
                push_escaped(out, std::str::from_utf8(good).unwrap_or_default());
                let n = e.error_len().unwrap_or(bad.len());
                for b in &bad[..n] {
                    out.push_str(&format!("%{b:02X}"));
                }
                rest = &bad[n..];
            }
        }
    }
}

fn push_escaped(out: &mut String, s: &str) {
    if !s.contains('%') {
        out.push_str(s);
        return;
    }
    for c in s.chars() {
        if c == '%' {
            out.push_str("%25")
        } else {
            out.push(c)
        }
    }
}

/// The path `encode` wrote as `text`.
pub fn decode(text: &str) -> PathBuf {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |j: usize| b.get(j).and_then(|c| (*c as char).to_digit(16));
        match (b[i], hex(i + 1), hex(i + 2)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    PathBuf::from(OsString::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_utf8_names_round_trip() {
        let names: [&[u8]; 4] = [b"plain/volume-1.nii.gz", b"odd\xff\xfe name.png", b"100%.png", "gr\u{fc}n.jpg".as_bytes()];
        for n in names {
            let p = PathBuf::from(OsString::from_vec(n.to_vec()));
            let text = encode(&p);
            assert_eq!(decode(&text), p, "{text}");
        }
        assert_eq!(encode(Path::new("a/b.png")), "a/b.png");
        assert_eq!(encode(&PathBuf::from(OsString::from_vec(b"x\xff".to_vec()))), "x%FF");
    }
}
