//! Offer/answer between two peer sets, SDP only (no datagrams): what a
//! rolled-back offer leaves behind.

use super::super::*;
use crate::simulcast::SimulcastConfig;
use crate::{PeerId, PeerSet, SetOutput};

/// Two sets, one peer each: a client (sending simulcast, as to a focus)
/// and a forwarding focus peer.
struct Pair {
    now: Instant,
    sets: [PeerSet; 2],
    next: u64,
    events: Vec<(usize, PeerEvent)>,
}

const C: usize = 0;
const F: usize = 1;
const P: PeerId = PeerId(1);

impl Pair {
    fn new() -> Pair {
        let now = Instant::now();
        let mut sets = [
            PeerSet::new(now, vec!["10.0.0.1:1000".parse().unwrap()]),
            PeerSet::new(now, vec!["10.0.0.2:1000".parse().unwrap()]),
        ];
        sets[C].add_peer(
            now,
            P,
            PeerConfig {
                data_channel: true,
                simulcast: Some(SimulcastConfig::default()),
                ..PeerConfig::default()
            },
        );
        sets[F].add_peer(
            now,
            P,
            PeerConfig {
                forward: true,
                receive_audio: false,
                receive_video: false,
                ..PeerConfig::default()
            },
        );
        Pair {
            now,
            sets,
            next: 1,
            events: Vec::new(),
        }
    }

    fn call(&mut self, set: usize, req: Request) -> Answer {
        let id = RequestId(self.next);
        self.next += 1;
        self.sets[set].request(self.now, P, Some(id), req);
        let mut answer = None;
        while let Some(o) = self.sets[set].poll_output() {
            match o {
                SetOutput::Answer {
                    request, answer: a, ..
                } if request == id => answer = Some(a),
                SetOutput::Event { event, .. } => self.events.push((set, event)),
                _ => {}
            }
        }
        answer.expect("an immediate answer")
    }

    fn sdp(&mut self, set: usize, req: Request) -> String {
        match self.call(set, req) {
            Ok(Reply::Sdp(s)) => s,
            other => panic!("no SDP: {other:?}"),
        }
    }

    fn offer(&mut self, set: usize, feeds: Vec<LocalFeed>) -> String {
        self.sdp(
            set,
            Request::CreateOffer {
                feeds,
                ice_restart: false,
            },
        )
    }

    fn accept(&mut self, set: usize, sdp: String, feeds: Vec<LocalFeed>) -> String {
        self.sdp(set, Request::AcceptOffer { sdp, feeds })
    }

    fn apply(&mut self, set: usize, sdp: String) {
        assert!(matches!(
            self.call(set, Request::ApplyAnswer { sdp }),
            Ok(Reply::Done)
        ));
    }

    /// The focus's send tracks and their m-lines.
    fn focus_tracks(&mut self) -> Vec<(String, Option<String>)> {
        match self.call(F, Request::Stats) {
            Ok(Reply::Stats(s)) => s.local.into_iter().map(|t| (t.track_id, t.mid)).collect(),
            other => panic!("no stats: {other:?}"),
        }
    }
}

/// The focus unsubscribes a client from a track (its offer removes the
/// track) while the client offers a screenshare: the offers cross and
/// the focus (polite) accepts the client's, with the track it still
/// sends. The rollback puts the removed track back on its m-line, so the
/// focus's next offer (the unsubscription again) has something to
/// negotiate. (Before, the track came back as a new, unbound track that
/// could not reuse its old m-line, and the next offer failed with nothing
/// to negotiate: the focus then believed it still sent the track and
/// never offered it again when the client resubscribed.)
#[test]
fn a_rolled_back_offer_puts_the_tracks_it_removed_back_on_their_lines() {
    let mut p = Pair::new();
    let c_feeds = vec![LocalFeed::usermedia("c")];
    let offer = p.offer(C, c_feeds.clone());
    let answer = p.accept(F, offer, vec![]);
    p.apply(C, answer);
    // The focus sends the client a forwarded feed.
    let x = vec![LocalFeed::usermedia("x")];
    let offer = p.offer(F, x.clone());
    let answer = p.accept(C, offer, c_feeds);
    p.apply(F, answer);
    let before = p.focus_tracks();
    assert_eq!(before.len(), 2, "{before:?}");
    assert!(before.iter().all(|(_, mid)| mid.is_some()), "{before:?}");

    // Crossing offers: the focus drops x, the client adds a screenshare.
    let _dropped = p.offer(F, vec![]);
    let c_offer = p.offer(
        C,
        vec![LocalFeed::usermedia("c"), LocalFeed::screenshare("cs")],
    );
    p.events.clear();
    let answer = p.accept(F, c_offer, x);
    p.apply(C, answer);
    assert!(
        p.events
            .iter()
            .any(|(s, e)| *s == F && matches!(e, PeerEvent::OfferRolledBack)),
        "{:?}",
        p.events
    );
    assert!(
        !p.events
            .iter()
            .any(|(s, e)| *s == F && matches!(e, PeerEvent::NegotiationNeeded)),
        "the focus's tracks found their lines again: {:?}",
        p.events
    );
    assert_eq!(p.focus_tracks(), before);

    // The unsubscription, offered again, negotiates.
    let offer = p.offer(F, vec![]);
    let answer = p.accept(
        C,
        offer,
        vec![LocalFeed::usermedia("c"), LocalFeed::screenshare("cs")],
    );
    p.apply(F, answer);
    assert!(p.focus_tracks().is_empty());
}
