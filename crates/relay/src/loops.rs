//! Mail loops, decided from a message's header section with no I/O. Every
//! copy godwit relays carries `X-Godwit-Trace: QUEUEID`; a message that
//! comes back carrying more of them than `smtp.max_trace_hops` has gone
//! round (gateway -> new -> old -> gateway). It is held, never bounced (a
//! bounce would go round too) and never relayed again. The Received count
//! (RFC 5321 6.3, `smtp.max_received_headers`) stays as a second line of
//! defence for loops through systems that drop our header.

/// The header section: up to the first empty line (RFC 5322 2.1).
fn header_section(message: &[u8]) -> &[u8] {
    let mut i = 0;
    while i < message.len() {
        let end = message[i..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(message.len(), |p| i + p + 1);
        let line = &message[i..end];
        if line == b"\r\n" || line == b"\n" {
            return &message[..i];
        }
        i = end;
    }
    message
}

/// Unfolded header fields (RFC 5322 2.2.3) as (name, value).
fn fields(message: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(header_section(message));
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.split('\n') {
        let line = line.trim_end_matches('\r');
        if line.starts_with([' ', '\t']) {
            if let Some(last) = out.last_mut() {
                last.1.push(' ');
                last.1.push_str(line.trim());
            }
        } else if let Some((n, v)) = line.split_once(':') {
            out.push((n.trim().to_string(), v.trim().to_string()));
        }
    }
    out
}

/// The queue IDs of the `X-Godwit-Trace` headers, newest (topmost) first.
pub fn trace_hops(message: &[u8]) -> Vec<String> {
    fields(message)
        .into_iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("X-Godwit-Trace"))
        .filter_map(|(_, v)| v.split_whitespace().next().map(str::to_string))
        .collect()
}

/// The path the message took as `HOST QUEUEID` per Received header that
/// names both (`by HOST ... id QUEUEID`, RFC 5321 4.4), oldest hop first.
pub fn received_path(message: &[u8]) -> Vec<String> {
    let mut path: Vec<String> = fields(message)
        .into_iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("Received"))
        .filter_map(|(_, v)| {
            let words: Vec<&str> = v.split_whitespace().collect();
            let after = |k: &str| {
                words
                    .iter()
                    .position(|w| w.eq_ignore_ascii_case(k))
                    .and_then(|i| words.get(i + 1))
                    .map(|w| w.trim_end_matches(';').to_string())
            };
            Some(format!("{} {}", after("by")?, after("id")?))
        })
        .collect();
    path.reverse();
    path
}

/// Whether a message with these trace hops is a loop to hold.
pub fn is_loop(trace_hops: usize, max_trace_hops: usize) -> bool {
    trace_hops > max_trace_hops
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hops_and_path_from_headers() {
        let msg = b"X-Godwit-Trace: Q3\r\n\
Received: from gw2 ([127.0.0.1])\r\n\tby gw1.test (godwit) with ESMTP id Q3\r\n\tfor <a@example.com>; Tue, 1 Dec 2026 10:00:02 +0000\r\n\
X-Godwit-Trace: Q2\r\n\
Received: from gw1 ([127.0.0.1])\r\n\tby gw2.test (godwit) with ESMTP id Q2; Tue, 1 Dec 2026 10:00:01 +0000\r\n\
X-Godwit-Trace: Q1\r\n\
Received: from client.test ([127.0.0.1]) by gw1.test (godwit) with ESMTP id Q1; Tue, 1 Dec 2026 10:00:00 +0000\r\n\
Subject: x\r\n\
\r\n\
X-Godwit-Trace: in-the-body\r\n";
        assert_eq!(trace_hops(msg), ["Q3", "Q2", "Q1"]);
        assert_eq!(
            received_path(msg),
            ["gw1.test Q1", "gw2.test Q2", "gw1.test Q3"]
        );
        for (hops, max, want) in [(0, 3, false), (3, 3, false), (4, 3, true), (1, 0, true)] {
            assert_eq!(is_loop(hops, max), want, "{hops} > {max}");
        }
        // No header section end: the whole message is headers; none at all.
        assert_eq!(trace_hops(b"X-Godwit-Trace: A\r\n"), ["A"]);
        assert!(trace_hops(b"Subject: x\r\n\r\n").is_empty());
    }
}
