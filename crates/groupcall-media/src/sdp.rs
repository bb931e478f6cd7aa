//! Reading the facts this crate needs from SDP text, and rewriting the
//! msid/direction of our own SDP.
//!
//! str0m keeps a single msid per m-line: for an m-line the remote created
//! it echoes the remote's msid back in our answer, and it does not keep the
//! msid the remote sends in answers to our offers. So this module reads the
//! remote's msid per mid itself, and rewrites each local SDP so that every
//! m-line carries exactly the `stream_id track_id` of the local track bound
//! to it (and no msid when nothing is sent on it).

use std::collections::HashMap;

use str0m::media::Direction;

/// One m-section of an SDP as this crate sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Section {
    /// `audio`, `video`, `application`, ...
    pub media: String,
    /// Port 0: the m-line is rejected/stopped.
    pub disabled: bool,
    /// `a=mid`.
    pub mid: Option<String>,
    /// Direction from the SDP author's point of view (default sendrecv).
    pub direction: Direction,
    /// `a=msid:<stream> <track>` (or from `a=ssrc:<n> msid:`).
    pub msid: Option<(String, String)>,
}

fn parse_direction(s: &str) -> Option<Direction> {
    match s {
        "sendrecv" => Some(Direction::SendRecv),
        "sendonly" => Some(Direction::SendOnly),
        "recvonly" => Some(Direction::RecvOnly),
        "inactive" => Some(Direction::Inactive),
        _ => None,
    }
}

pub(crate) fn direction_str(d: Direction) -> &'static str {
    match d {
        Direction::SendRecv => "sendrecv",
        Direction::SendOnly => "sendonly",
        Direction::RecvOnly => "recvonly",
        Direction::Inactive => "inactive",
    }
}

fn split_msid(v: &str) -> Option<(String, String)> {
    let mut it = v.split_whitespace();
    let stream = it.next()?;
    let track = it.next().unwrap_or("");
    Some((stream.to_string(), track.to_string()))
}

/// Splits SDP text into lines, accepting `\r\n` and `\n`.
fn lines(sdp: &str) -> impl Iterator<Item = &str> {
    sdp.split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .filter(|l| !l.is_empty())
}

/// The m-sections of `sdp`, in order. Never fails: what it cannot read it
/// leaves out.
pub(crate) fn parse_sections(sdp: &str) -> Vec<Section> {
    let mut out: Vec<Section> = Vec::new();
    for line in lines(sdp) {
        if let Some(m) = line.strip_prefix("m=") {
            let mut it = m.split_whitespace();
            let media = it.next().unwrap_or("").to_string();
            let disabled = it.next().is_some_and(|p| p == "0");
            out.push(Section {
                media,
                disabled,
                mid: None,
                direction: Direction::SendRecv,
                msid: None,
            });
            continue;
        }
        let Some(sec) = out.last_mut() else { continue };
        let Some(attr) = line.strip_prefix("a=") else {
            continue;
        };
        if let Some(mid) = attr.strip_prefix("mid:") {
            sec.mid = Some(mid.trim().to_string());
        } else if let Some(d) = parse_direction(attr.trim()) {
            sec.direction = d;
        } else if let Some(v) = attr.strip_prefix("msid:") {
            sec.msid = split_msid(v);
        } else if let Some(v) = attr.strip_prefix("ssrc:")
            && sec.msid.is_none()
            && let Some((_, rest)) = v.split_once(' ')
            && let Some(m) = rest.strip_prefix("msid:")
        {
            sec.msid = split_msid(m);
        }
    }
    out
}

/// What to write for one of our m-lines.
#[derive(Debug, Clone, Default)]
pub(crate) struct LinePlan {
    /// `Some` = this msid; `None` = no msid at all.
    pub msid: Option<(String, String)>,
    /// Replace the direction attribute, if set.
    pub direction: Option<Direction>,
}

/// Rewrites our SDP: msid per mid as planned (mids without a plan are left
/// alone), directions where planned, and the session's msid-semantic line.
pub(crate) fn rewrite_local(sdp: &str, plan: &HashMap<String, LinePlan>) -> String {
    // Group lines into the session part and m-sections.
    let mut session: Vec<&str> = Vec::new();
    let mut sections: Vec<Vec<&str>> = Vec::new();
    for line in lines(sdp) {
        if line.starts_with("m=") {
            sections.push(vec![line]);
        } else if let Some(s) = sections.last_mut() {
            s.push(line);
        } else {
            session.push(line);
        }
    }

    let mut stream_ids: Vec<String> = Vec::new();
    let mut rendered: Vec<String> = Vec::new();
    for sec in &sections {
        let mid = sec
            .iter()
            .find_map(|l| l.strip_prefix("a=mid:"))
            .map(|m| m.trim().to_string());
        let line_plan = mid.as_ref().and_then(|m| plan.get(m));
        let Some(p) = line_plan else {
            for l in sec {
                if let Some(v) = l.strip_prefix("a=msid:")
                    && let Some((s, _)) = split_msid(v)
                    && !stream_ids.contains(&s)
                    && s != "-"
                {
                    stream_ids.push(s);
                }
                rendered.push(format!("{l}\r\n"));
            }
            continue;
        };
        let disabled = sec
            .first()
            .and_then(|m| m.split_whitespace().nth(1))
            .is_some_and(|port| port == "0");
        let msid_value = p.msid.as_ref().map(|(s, t)| format!("{s} {t}"));
        if let Some((s, _)) = &p.msid
            && !stream_ids.contains(s)
            && !disabled
        {
            stream_ids.push(s.clone());
        }
        let mut wrote_msid = false;
        let mut out: Vec<String> = Vec::new();
        for l in sec {
            if let Some(attr) = l.strip_prefix("a=") {
                if parse_direction(attr).is_some() {
                    let d = p.direction.map(direction_str).unwrap_or(attr).to_string();
                    out.push(format!("a={d}"));
                    continue;
                }
                if attr.starts_with("msid:") {
                    if let (Some(v), false) = (&msid_value, disabled) {
                        out.push(format!("a=msid:{v}"));
                        wrote_msid = true;
                    }
                    continue;
                }
                // Nothing is sent on a line without a track: no SSRCs either
                // (libwebrtc refuses SSRC lines it cannot tie to one track).
                let sends = msid_value.is_some() && !disabled;
                if attr.starts_with("ssrc-group:") && !sends {
                    continue;
                }
                if let Some(v) = attr.strip_prefix("ssrc:") {
                    if !sends {
                        continue;
                    }
                    if let Some((ssrc, rest)) = v.split_once(' ')
                        && rest.starts_with("msid:")
                        && let Some(m) = &msid_value
                    {
                        out.push(format!("a=ssrc:{ssrc} msid:{m}"));
                        continue;
                    }
                }
            }
            out.push((*l).to_string());
        }
        // str0m writes msid for every enabled m-line; add one if it did not.
        if !wrote_msid
            && !disabled
            && let Some(v) = &msid_value
        {
            let at = out
                .iter()
                .position(|l| l.starts_with("a=mid:"))
                .map(|i| i + 1)
                .unwrap_or(out.len());
            out.insert(at, format!("a=msid:{v}"));
        }
        for l in out {
            rendered.push(format!("{l}\r\n"));
        }
    }

    let mut text = String::with_capacity(sdp.len() + 64);
    for l in session {
        if l.starts_with("a=msid-semantic:") {
            text.push_str("a=msid-semantic: WMS");
            for s in &stream_ids {
                text.push(' ');
                text.push_str(s);
            }
            text.push_str("\r\n");
        } else {
            text.push_str(l);
            text.push_str("\r\n");
        }
    }
    for l in rendered {
        text.push_str(&l);
    }
    text
}

/// Whether `s` is a valid msid id (RFC 8830: 1*64 token-char).
pub(crate) fn is_valid_msid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars().all(|c| {
            let u = c as u32;
            u == 0x21
                || (0x23..=0x27).contains(&u)
                || (0x2a..=0x2b).contains(&u)
                || (0x2d..=0x2e).contains(&u)
                || (0x30..=0x39).contains(&u)
                || (0x41..=0x5a).contains(&u)
                || (0x5e..=0x7e).contains(&u)
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    const SDP: &str = "v=0\r\no=- 1 2 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n\
a=group:BUNDLE 0 1\r\na=msid-semantic: WMS remote\r\n\
m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=sendrecv\r\na=msid:remote rtrack\r\n\
a=ssrc:11 cname:x\r\na=ssrc:11 msid:remote rtrack\r\n\
m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na=sendrecv\r\na=msid:remote vtrack\r\n\
a=ssrc:21 cname:y\r\na=ssrc:22 cname:y\r\na=ssrc-group:FID 21 22\r\n\
m=video 0 UDP/TLS/RTP/SAVPF 96\r\na=mid:2\r\na=inactive\r\n";

    #[test]
    fn parses_sections() {
        let s = parse_sections(SDP);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].media, "audio");
        assert_eq!(s[0].mid.as_deref(), Some("0"));
        assert_eq!(
            s[0].msid,
            Some(("remote".to_string(), "rtrack".to_string()))
        );
        assert!(s[2].disabled);
        assert_eq!(s[2].direction, Direction::Inactive);
        assert!(parse_sections("garbage\nm=\na=msid:\n").len() == 1);
    }

    #[test]
    fn rewrites_msid_and_direction() {
        let mut plan = HashMap::new();
        plan.insert(
            "0".to_string(),
            LinePlan {
                msid: Some(("mine".into(), "a1".into())),
                direction: None,
            },
        );
        plan.insert(
            "1".to_string(),
            LinePlan {
                msid: None,
                direction: Some(Direction::RecvOnly),
            },
        );
        let out = rewrite_local(SDP, &plan);
        assert!(out.contains("a=msid-semantic: WMS mine\r\n"));
        assert!(out.contains("a=msid:mine a1\r\n"));
        assert!(out.contains("a=ssrc:11 msid:mine a1\r\n"));
        assert!(!out.contains("remote"));
        assert_eq!(out.matches("a=ssrc:").count(), 2);
        let s = parse_sections(&out);
        assert_eq!(s[1].direction, Direction::RecvOnly);
        assert_eq!(s[1].msid, None);
        assert_eq!(s[0].direction, Direction::SendRecv);
    }

    #[test]
    fn msid_ids() {
        assert!(is_valid_msid_id("2f3c1a4e-aaaa-bbbb-cccc-0123456789ab"));
        assert!(!is_valid_msid_id(""));
        assert!(!is_valid_msid_id("has space"));
        assert!(!is_valid_msid_id(&"x".repeat(65)));
    }
}
