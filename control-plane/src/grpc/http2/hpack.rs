//! HPACK (RFC 7541): the header compression of HTTP/2.
//!
//! The decoder is complete: indexed fields, literals with and without
//! indexing, the dynamic table and its size updates, and Huffman-coded
//! strings, because clients use all of them. The encoder writes literals
//! that are never added to the peer's table, with names from the static
//! table where they are in it: a response head or trailers is a few dozen
//! bytes, and the peer's table size never matters.

use bytes::{BufMut, Bytes, BytesMut};
use std::collections::VecDeque;
use std::sync::OnceLock;

/// The static table (RFC 7541, appendix A); index 1 is the first.
const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// Why a header block could not be decoded: a connection error
/// (COMPRESSION_ERROR), since the decoder's state is lost with it.
#[derive(Debug, PartialEq, Eq)]
pub struct DecodeError(pub &'static str);

/// A decoded field: name and value, as sent (names are checked by the
/// caller).
pub type Field = (Bytes, Bytes);

/// One connection's decoder, with its dynamic table.
pub struct Decoder {
    /// Newest first: index 62 is the front.
    table: VecDeque<Field>,
    size: usize,
    /// The size the peer chose (a size update), at most `max_size`.
    limit: usize,
    /// What SETTINGS_HEADER_TABLE_SIZE allows.
    max_size: usize,
}

impl Decoder {
    pub fn new(max_size: usize) -> Decoder {
        Decoder {
            table: VecDeque::new(),
            size: 0,
            limit: max_size,
            max_size,
        }
    }

    /// Decodes one whole header block, calling `field` for each field in
    /// order. `max_list` bounds the decoded size (names, values and 32
    /// bytes each, as SETTINGS_MAX_HEADER_LIST_SIZE counts): past it the
    /// block is still decoded, to keep the table in step, and this returns
    /// `Ok(false)`.
    pub fn decode(
        &mut self,
        mut block: &[u8],
        max_list: usize,
        mut field: impl FnMut(Field),
    ) -> Result<bool, DecodeError> {
        let mut listed = 0usize;
        let mut first = true;
        while let Some(&byte) = block.first() {
            if byte & 0xe0 == 0x20 {
                // Dynamic table size update: only at the start of a block.
                if !first {
                    return Err(DecodeError("a table size update after a field"));
                }
                let size = integer(&mut block, 5)?;
                if size > self.max_size {
                    return Err(DecodeError("a table size update over the limit"));
                }
                self.limit = size;
                self.evict(0);
                continue;
            }
            first = false;
            let (name, value) = if byte & 0x80 != 0 {
                let index = integer(&mut block, 7)?;
                self.get(index)?
            } else {
                let (prefix, indexing) = if byte & 0xc0 == 0x40 {
                    (6, true)
                } else {
                    // Without indexing (0000) or never indexed (0001).
                    (4, false)
                };
                let index = integer(&mut block, prefix)?;
                let name = if index == 0 {
                    string(&mut block)?
                } else {
                    self.get(index)?.0
                };
                let value = string(&mut block)?;
                if indexing {
                    self.insert(name.clone(), value.clone());
                }
                (name, value)
            };
            listed = listed.saturating_add(name.len() + value.len() + 32);
            if listed <= max_list {
                field((name, value));
            }
        }
        Ok(listed <= max_list)
    }

    fn get(&self, index: usize) -> Result<Field, DecodeError> {
        match index {
            0 => Err(DecodeError("index 0")),
            1..=61 => {
                let (name, value) = STATIC[index - 1];
                Ok((
                    Bytes::from_static(name.as_bytes()),
                    Bytes::from_static(value.as_bytes()),
                ))
            }
            _ => self
                .table
                .get(index - 62)
                .cloned()
                .ok_or(DecodeError("an index past the tables")),
        }
    }

    fn insert(&mut self, name: Bytes, value: Bytes) {
        let size = name.len() + value.len() + 32;
        if size > self.limit {
            // Larger than the whole table: it empties the table.
            self.table.clear();
            self.size = 0;
            return;
        }
        self.evict(size);
        self.size += size;
        self.table.push_front((name, value));
    }

    /// Drops the oldest entries until `room` more bytes fit.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.limit {
            let Some((name, value)) = self.table.pop_back() else {
                break;
            };
            self.size -= name.len() + value.len() + 32;
        }
    }
}

/// An integer with an N-bit prefix (RFC 7541, 5.1).
fn integer(block: &mut &[u8], prefix: u8) -> Result<usize, DecodeError> {
    let mask = (1u16 << prefix) as usize - 1;
    let (&first, mut rest) = block.split_first().ok_or(DecodeError("a cut integer"))?;
    let mut value = first as usize & mask;
    if value == mask {
        let mut shift = 0;
        loop {
            let (&byte, after) = rest.split_first().ok_or(DecodeError("a cut integer"))?;
            rest = after;
            if shift > 28 {
                return Err(DecodeError("an integer too large"));
            }
            value += ((byte & 0x7f) as usize) << shift;
            shift += 7;
            if byte & 0x80 == 0 {
                break;
            }
        }
    }
    *block = rest;
    Ok(value)
}

/// A string literal (RFC 7541, 5.2), Huffman-decoded when so flagged.
fn string(block: &mut &[u8]) -> Result<Bytes, DecodeError> {
    let huffman = block.first().ok_or(DecodeError("a cut string"))? & 0x80 != 0;
    let len = integer(block, 7)?;
    if block.len() < len {
        return Err(DecodeError("a cut string"));
    }
    let (raw, rest) = block.split_at(len);
    *block = rest;
    if huffman {
        huffman_decode(raw).map(Bytes::from)
    } else {
        Ok(Bytes::copy_from_slice(raw))
    }
}

/// The Huffman code's lengths (RFC 7541, appendix B), by symbol; 256 is
/// EOS. The code is canonical: the codes follow from the lengths.
const HUFFMAN_LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28,
    28, 28, 28, 28, 28, 28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5,
    5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6,
    6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22, 22, 23, 22,
    23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22,
    21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20,
    22, 22, 22, 23, 22, 22, 23, 26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19,
    21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22,
    22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, 30,
];

/// The decoding tree: node `i` has children `2i`-ish, stored flat. A leaf
/// holds its symbol.
struct Tree {
    /// For each node, its two children: a node index, or a leaf
    /// (`LEAF | symbol`).
    nodes: Vec<[u16; 2]>,
}

const LEAF: u16 = 0x8000;

fn tree() -> &'static Tree {
    static TREE: OnceLock<Tree> = OnceLock::new();
    TREE.get_or_init(|| {
        let mut symbols: Vec<usize> = (0..257).collect();
        symbols.sort_by_key(|&s| (HUFFMAN_LENGTHS[s], s));
        let mut nodes = vec![[0u16; 2]];
        let mut code = 0u32;
        let mut previous = HUFFMAN_LENGTHS[symbols[0]];
        for (i, &symbol) in symbols.iter().enumerate() {
            let len = HUFFMAN_LENGTHS[symbol];
            if i > 0 {
                code = (code + 1) << (len - previous);
            }
            previous = len;
            let mut node = 0usize;
            for bit in (0..len).rev() {
                let b = ((code >> bit) & 1) as usize;
                if bit == 0 {
                    nodes[node][b] = LEAF | symbol as u16;
                } else {
                    if nodes[node][b] == 0 {
                        nodes.push([0, 0]);
                        nodes[node][b] = (nodes.len() - 1) as u16;
                    }
                    node = nodes[node][b] as usize;
                }
            }
        }
        Tree { nodes }
    })
}

fn huffman_decode(raw: &[u8]) -> Result<Vec<u8>, DecodeError> {
    let tree = tree();
    let mut out = Vec::with_capacity(raw.len() * 8 / 5);
    let mut node = 0usize;
    // Bits read since the last symbol, and whether all were ones.
    let mut pending = 0u32;
    let mut all_ones = true;
    for &byte in raw {
        for bit in (0..8).rev() {
            let b = ((byte >> bit) & 1) as usize;
            pending += 1;
            all_ones &= b == 1;
            let next = tree.nodes[node][b];
            if next & LEAF != 0 {
                let symbol = next & !LEAF;
                if symbol == 256 {
                    return Err(DecodeError("EOS inside a Huffman string"));
                }
                out.push(symbol as u8);
                node = 0;
                pending = 0;
                all_ones = true;
            } else {
                node = next as usize;
            }
        }
    }
    // What is left must be padding: under 8 bits, all ones (EOS's prefix).
    if pending > 7 || !all_ones {
        return Err(DecodeError("bad padding after a Huffman string"));
    }
    Ok(out)
}

/// Appends an integer with an N-bit prefix, the prefix's other bits
/// being `flags`.
fn put_integer(out: &mut BytesMut, flags: u8, prefix: u8, mut value: usize) {
    let mask = (1usize << prefix) - 1;
    if value < mask {
        out.put_u8(flags | value as u8);
        return;
    }
    out.put_u8(flags | mask as u8);
    value -= mask;
    while value >= 0x80 {
        out.put_u8((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    out.put_u8(value as u8);
}

fn put_string(out: &mut BytesMut, value: &[u8]) {
    put_integer(out, 0, 7, value.len());
    out.put_slice(value);
}

/// Appends one field as a literal never added to the peer's table: with
/// the static table's name where it has it.
pub fn encode_field(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    match STATIC.iter().position(|(n, _)| n.as_bytes() == name) {
        Some(index) => put_integer(out, 0, 4, index + 1),
        None => {
            out.put_u8(0);
            put_string(out, name);
        }
    }
    put_string(out, value);
}

/// Appends `:status`: index 8 for 200, else a literal with its name.
pub fn encode_status(out: &mut BytesMut, status: u16) {
    if status == 200 {
        out.put_u8(0x88);
    } else {
        encode_field(out, b":status", status.to_string().as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn fields(decoder: &mut Decoder, block: &[u8]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let whole = decoder
            .decode(block, usize::MAX, |(n, v)| {
                out.push((
                    String::from_utf8(n.to_vec()).unwrap(),
                    String::from_utf8(v.to_vec()).unwrap(),
                ))
            })
            .unwrap();
        assert!(whole);
        out
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn huffman_strings_decode_as_in_the_rfc() {
        for (coded, plain) in [
            ("f1e3 c2e5 f23a 6ba0 ab90 f4ff", "www.example.com"),
            ("a8eb 1064 9cbf", "no-cache"),
            ("25a8 49e9 5ba9 7d7f", "custom-key"),
            ("25a8 49e9 5bb8 e8b4 bf", "custom-value"),
            ("6402", "302"),
            ("aec3 771a 4b", "private"),
            (
                "d07a be94 1054 d444 a820 0595 040b 8166 e082 a62d 1bff",
                "Mon, 21 Oct 2013 20:13:21 GMT",
            ),
            (
                "9d29 ad17 1863 c78f 0b97 c8e9 ae82 ae43 d3",
                "https://www.example.com",
            ),
        ] {
            assert_eq!(huffman_decode(&hex(coded)).unwrap(), plain.as_bytes());
        }
        // Padding longer than 7 bits, or not all ones, is an error.
        assert!(huffman_decode(&hex("f1e3 c2e5 f23a 6ba0 ab90 f4ff ff")).is_err());
        // '0' (00000) then 000: padding that is not EOS's prefix.
        assert!(huffman_decode(&hex("00")).is_err());
    }

    #[test]
    fn requests_decode_with_the_dynamic_table_as_in_the_rfc() {
        // RFC 7541, C.4: three requests on one connection, Huffman-coded.
        let mut decoder = Decoder::new(4096);
        assert_eq!(
            fields(
                &mut decoder,
                &hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff")
            ),
            pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
            ])
        );
        assert_eq!(decoder.size, 57);
        assert_eq!(
            fields(&mut decoder, &hex("8286 84be 5886 a8eb 1064 9cbf")),
            pairs(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
                ("cache-control", "no-cache"),
            ])
        );
        assert_eq!(
            fields(
                &mut decoder,
                &hex("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf")
            ),
            pairs(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value"),
            ])
        );
        assert_eq!(decoder.size, 164);
    }

    #[test]
    fn the_table_evicts_the_oldest_and_follows_size_updates() {
        // RFC 7541, C.5: responses with a 256-byte table, literals.
        let mut decoder = Decoder::new(256);
        let first = hex(
            "4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70 6c65 2e63 6f6d",
        );
        fields(&mut decoder, &first);
        assert_eq!(decoder.size, 222);
        let second = hex("4803 3330 37c1 c0bf");
        assert_eq!(
            fields(&mut decoder, &second),
            pairs(&[
                (":status", "307"),
                ("cache-control", "private"),
                ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
                ("location", "https://www.example.com"),
            ])
        );
        assert_eq!(decoder.size, 222);
        // A size update to 0 empties the table; an index into it fails.
        fields(&mut decoder, &hex("20"));
        assert_eq!(decoder.size, 0);
        assert!(decoder.decode(&hex("be"), usize::MAX, |_| {}).is_err());
        // Over what SETTINGS allows, or after a field: refused.
        assert!(decoder.decode(&hex("3fe1 1f"), usize::MAX, |_| {}).is_err());
        assert!(decoder.decode(&hex("8220"), usize::MAX, |_| {}).is_err());
    }

    #[test]
    fn a_list_over_the_limit_is_decoded_but_not_handed_on() {
        let mut decoder = Decoder::new(4096);
        let block = hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff");
        let mut seen = 0;
        assert!(!decoder.decode(&block, 100, |_| seen += 1).unwrap());
        assert!(seen < 4);
        // The table kept up: the next block's index 62 resolves.
        assert_eq!(
            fields(&mut decoder, &hex("be")),
            pairs(&[(":authority", "www.example.com")])
        );
    }

    #[test]
    fn what_is_encoded_decodes_to_the_same_fields() {
        let mut out = BytesMut::new();
        encode_status(&mut out, 200);
        encode_status(&mut out, 404);
        encode_field(&mut out, b"content-type", b"application/grpc");
        encode_field(&mut out, b"grpc-message", &[b'x'; 300]);
        let mut decoder = Decoder::new(4096);
        let got = fields(&mut decoder, &out);
        assert_eq!(
            got,
            pairs(&[
                (":status", "200"),
                (":status", "404"),
                ("content-type", "application/grpc"),
                ("grpc-message", &"x".repeat(300)),
            ])
        );
        // Nothing went into the peer's table.
        assert_eq!(decoder.size, 0);
    }
}
