//! tonic answers a request it cannot decode with INTERNAL ("failed to
//! decode Protobuf message") and one over the size limit with OUT_OF_RANGE.
//! Both are the client's fault: they become INVALID_ARGUMENT, saying what
//! was wrong with the request, in the response's headers (these errors are
//! "trailers-only" responses, sent before any body).

use tonic::codegen::http::{HeaderMap, HeaderValue};

const INTERNAL: &str = "13";
const OUT_OF_RANGE: &str = "11";
const INVALID_ARGUMENT: &str = "3";

/// Rewrites a transport-level decode or size error into INVALID_ARGUMENT.
pub fn clarify(headers: &mut HeaderMap) {
    let Some(code) = headers.get("grpc-status").and_then(|v| v.to_str().ok()) else {
        return;
    };
    let message = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .map(percent_decode)
        .unwrap_or_default();
    let clear = match code {
        INTERNAL if message.starts_with("failed to decode Protobuf message") => format!(
            "request: not a valid message for this method ({})",
            message.trim_start_matches("failed to decode Protobuf message: ")
        ),
        OUT_OF_RANGE if message.contains("message length too large") => {
            let sizes: Vec<&str> = message
                .split(|c: char| !c.is_ascii_digit())
                .filter(|p| !p.is_empty())
                .collect();
            match sizes.as_slice() {
                [found, limit, ..] => format!(
                    "request: the message is {found} bytes, over the limit of {limit} bytes"
                ),
                _ => format!("request: the message is over the size limit ({message})"),
            }
        }
        _ => return,
    };
    headers.insert("grpc-status", HeaderValue::from_static(INVALID_ARGUMENT));
    if let Ok(value) = HeaderValue::from_str(&percent_encode(&clear)) {
        headers.insert("grpc-message", value);
    }
}

/// gRPC's grpc-message encoding: percent-encoding of bytes outside
/// printable ASCII and of '%'.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if (0x20..0x7f).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(byte) = u8::from_str_radix(&text[i + 1..i + 3], 16)
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(code: &str, message: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_str(code).unwrap());
        h.insert(
            "grpc-message",
            HeaderValue::from_str(&percent_encode(message)).unwrap(),
        );
        h
    }

    fn message(h: &HeaderMap) -> String {
        percent_decode(h["grpc-message"].to_str().unwrap())
    }

    #[test]
    fn decode_and_size_errors_become_invalid_argument() {
        let mut h = headers(
            "13",
            "failed to decode Protobuf message: CreateModelRequest.model: invalid wire type: Varint (expected LengthDelimited)",
        );
        clarify(&mut h);
        assert_eq!(h["grpc-status"], "3");
        assert_eq!(
            message(&h),
            "request: not a valid message for this method (CreateModelRequest.model: invalid wire type: Varint (expected LengthDelimited))"
        );
        let mut h = headers(
            "11",
            "Error, decoded message length too large: found 5242890 bytes, the limit is: 4194304 bytes",
        );
        clarify(&mut h);
        assert_eq!(h["grpc-status"], "3");
        assert_eq!(
            message(&h),
            "request: the message is 5242890 bytes, over the limit of 4194304 bytes"
        );
        let mut other = headers("13", "internal storage error; see the duofleetd log");
        clarify(&mut other);
        assert_eq!(other["grpc-status"], "13");
    }
}
