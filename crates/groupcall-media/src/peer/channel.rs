//! The data channel of a peer (MSC3898's signalling channel with a focus):
//! one reliable, ordered SCTP channel negotiated in the SDP. The offerer
//! opens it ([`PeerConfig::data_channel`]); the answerer accepts whatever
//! channel the remote opens. Text only; sends are bounded by str0m's SCTP
//! send buffer (a message that does not fit is refused, not queued).

use str0m::channel::ChannelConfig;

use super::*;

/// The configuration of the channel we open.
pub(super) fn channel_config() -> ChannelConfig {
    ChannelConfig {
        label: DATA_CHANNEL_LABEL.to_string(),
        ordered: true,
        ..Default::default()
    }
}

impl PeerState {
    /// Whether the next offer is to carry the data channel (once per peer).
    pub(super) fn wants_channel_in_offer(&self) -> bool {
        self.config.data_channel && !self.channel_offered && self.channel.is_none()
    }

    pub(super) fn on_channel_open(&mut self, id: ChannelId, label: String) {
        if self.channel.is_some() {
            debug!(?id, %label, "another data channel opened: ignored");
            return;
        }
        info!(%label, "data channel open");
        self.channel = Some(id);
        self.emit(PeerEvent::ChannelOpen { label });
    }

    pub(super) fn on_channel_data(&mut self, id: ChannelId, binary: bool, data: Vec<u8>) {
        if self.channel != Some(id) || binary {
            self.channel_dropped += 1;
            debug!(
                ?id,
                binary,
                len = data.len(),
                "data channel message dropped"
            );
            return;
        }
        match String::from_utf8(data) {
            Ok(text) => self.emit(PeerEvent::ChannelMessage { text }),
            Err(e) => {
                self.channel_dropped += 1;
                debug!(error = %e, "data channel message is not UTF-8: dropped");
            }
        }
    }

    pub(super) fn on_channel_close(&mut self, id: ChannelId) {
        if self.channel == Some(id) {
            info!("data channel closed");
            self.channel = None;
            self.emit(PeerEvent::ChannelClosed);
        }
    }

    /// Sends a text message, or refuses it (never queued beyond str0m's
    /// bounded SCTP buffer). The caller drains.
    pub(super) fn send_channel(&mut self, text: &str) -> Result<(), MediaError> {
        let id = self.channel.ok_or(MediaError::ChannelNotOpen)?;
        if text.len() > MAX_CHANNEL_MESSAGE {
            return Err(MediaError::ChannelMessageTooLarge {
                len: text.len(),
                max: MAX_CHANNEL_MESSAGE,
            });
        }
        let mut ch = self.rtc.channel(id).ok_or(MediaError::ChannelNotOpen)?;
        let accepted = ch
            .write(false, text.as_bytes())
            .map_err(|e| MediaError::Rtc(e.to_string()))?;
        if !accepted {
            debug!(len = text.len(), "data channel full: message refused");
            return Err(MediaError::ChannelFull { len: text.len() });
        }
        Ok(())
    }
}
