//! Sending to-device messages, plaintext or Olm-encrypted, and what to do
//! with a recipient device that has published no keys.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use super::retry::{self, Retry};

use matrix_sdk::encryption::identities::Device;
use matrix_sdk::ruma::api::client::to_device::send_event_to_device::v3::{
    Messages, Request as SendToDeviceRequest,
};
use matrix_sdk::ruma::events::{AnyToDeviceEventContent, ToDeviceEventType};
use matrix_sdk::ruma::serde::Raw;
use matrix_sdk::ruma::to_device::DeviceIdOrAllDevices;
use matrix_sdk::ruma::{OwnedDeviceId, OwnedUserId, TransactionId};
use serde_json::Value;
use tracing::{debug, info, warn};

use super::{MatrixError, MatrixSession};

/// How long a "this device has no published keys" answer is trusted before
/// its keys are queried again. An invite (a new call) always queries again.
const KEYLESS_RECHECK: Duration = Duration::from_secs(15);

/// The event type that starts a call: its recipient's keys are always
/// queried again when we have none.
const INVITE: &str = "m.call.invite";

/// Recipient devices found to have no published keys, with when we last
/// asked the homeserver (see [`KEYLESS_RECHECK`]).
pub(crate) type KeylessCache = std::sync::Mutex<HashMap<(OwnedUserId, OwnedDeviceId), Instant>>;

/// What [`MatrixSession::send_olm_or_plaintext`] does with a recipient device
/// that has published no device keys (a client without crypto): Olm needs
/// them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeylessDevices {
    /// Send its messages as plaintext to-device messages (what the
    /// reference client does; MSC3401 says signalling *should* be
    /// encrypted).
    Plaintext,
    /// Do not send to it at all (encryption required).
    Refuse,
}

/// How the messages of one [`MatrixSession::send_signalling`] went, per
/// recipient `(user_id, device_id)`.
#[derive(Debug, Default)]
pub struct SendReport {
    /// Sent Olm-encrypted.
    pub encrypted: Vec<(String, String)>,
    /// The device has no published keys: sent as plaintext.
    pub plaintext_no_keys: Vec<(String, String)>,
    /// The device has no published keys: not sent
    /// ([`KeylessDevices::Refuse`]).
    pub refused_no_keys: Vec<(String, String)>,
    /// Sent as plaintext because encryption was not asked for.
    pub plaintext_chosen: Vec<(String, String)>,
    /// Recipients that did not get their message for another reason (in
    /// [`MatrixError::ToDeviceFailed`]).
    pub error: Option<MatrixError>,
}

/// How signalling to one remote device went, as [`SendModes::changes`]
/// reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSendMode {
    /// The recipient user.
    pub user_id: String,
    /// The recipient device.
    pub device_id: String,
    /// Olm-encrypted (true) or plaintext (false).
    pub encrypted: bool,
    /// Nothing was sent: the device has no keys and encryption is required.
    pub refused: bool,
    /// Why not encrypted (`None` when encrypted).
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Encrypted,
    PlaintextNoKeys,
    RefusedNoKeys,
    PlaintextChosen,
}

const NO_KEYS: &str = "the device has published no keys (a client without crypto)";

/// Remembers how signalling last went to each remote device, to report it
/// the first time and on every change (with a log line).
#[derive(Debug, Default)]
pub struct SendModes(HashMap<(String, String), Mode>);

impl SendModes {
    /// The devices of `report` whose mode is new or changed. Logs a warning
    /// for each device that goes plaintext or is refused for lack of keys.
    pub fn changes(&mut self, report: &SendReport, event_type: &str) -> Vec<DeviceSendMode> {
        let mut out = Vec::new();
        for (to, mode) in [
            (&report.encrypted, Mode::Encrypted),
            (&report.plaintext_no_keys, Mode::PlaintextNoKeys),
            (&report.refused_no_keys, Mode::RefusedNoKeys),
            (&report.plaintext_chosen, Mode::PlaintextChosen),
        ] {
            for (user, device) in to {
                if mode == Mode::RefusedNoKeys {
                    debug!(%user, %device, event_type, "not sent: {NO_KEYS} and encryption is required");
                }
                if device == "*"
                    || self.0.insert((user.clone(), device.clone()), mode) == Some(mode)
                {
                    continue;
                }
                let reason = match mode {
                    Mode::Encrypted => {
                        info!(%user, %device, "call signalling to this device is Olm-encrypted");
                        None
                    }
                    Mode::PlaintextNoKeys => {
                        warn!(%user, %device, "{NO_KEYS}: sending its call signalling as plaintext");
                        Some(format!("{NO_KEYS}: sent as plaintext"))
                    }
                    Mode::RefusedNoKeys => {
                        warn!(%user, %device, "{NO_KEYS} and encryption is required: sending it no call signalling");
                        Some(format!(
                            "{NO_KEYS} and encryption is required: nothing is sent to it"
                        ))
                    }
                    Mode::PlaintextChosen => Some("encryption is off".to_owned()),
                };
                out.push(DeviceSendMode {
                    user_id: user.clone(),
                    device_id: device.clone(),
                    encrypted: mode == Mode::Encrypted,
                    refused: mode == Mode::RefusedNoKeys,
                    reason,
                });
            }
        }
        out
    }
}

/// A recipient resolved to devices with keys, or to none.
enum Recipient {
    Devices(Vec<Device>),
    Keyless,
}

impl MatrixSession {
    /// Sends a to-device event to each `(user_id, device_id, content)`.
    ///
    /// Plaintext: one `sendToDevice` request carries all recipients
    /// (`device_id` `*` means all of the user's devices). Encrypted: each
    /// recipient device gets its content Olm-encrypted (devices that share a
    /// content are encrypted and sent together); devices we do not know yet
    /// are looked up with `/keys/query` first.
    ///
    /// Transient failures are retried (4 attempts, 200 ms doubling); recipients
    /// that still did not get the message are reported in
    /// [`MatrixError::ToDeviceFailed`].
    pub async fn send_to_device(
        &self,
        event_type: &str,
        messages: Vec<(String, String, Value)>,
        encrypted: bool,
    ) -> Result<(), MatrixError> {
        if messages.is_empty() {
            return Ok(());
        }
        if encrypted {
            self.send_encrypted(event_type, messages).await
        } else {
            self.send_plain(event_type, messages).await
        }
    }

    async fn send_plain(
        &self,
        event_type: &str,
        messages: Vec<(String, String, Value)>,
    ) -> Result<(), MatrixError> {
        let mut map: Messages = BTreeMap::new();
        let mut recipients = Vec::with_capacity(messages.len());
        for (user, device, content) in messages {
            let user_id = Self::parse_user_id(&user)?;
            let target = if device == "*" {
                DeviceIdOrAllDevices::AllDevices
            } else {
                DeviceIdOrAllDevices::DeviceId(OwnedDeviceId::from(device.as_str()))
            };
            map.entry(user_id)
                .or_default()
                .insert(target, to_device_content(&content)?);
            recipients.push((user, device));
        }
        // One transaction id for all attempts: the homeserver deduplicates
        // a retry of a request that did arrive.
        let txn_id = TransactionId::new();
        let what = format!("sending to-device {event_type}");
        let request =
            SendToDeviceRequest::new_raw(ToDeviceEventType::from(event_type), txn_id, map);
        let sent = retry::REQUEST
            .run(
                &what,
                || {
                    self.client
                        .send(request.clone())
                        .with_request_config(retry::once())
                },
                |e| retry::classify_http(e, Retry::Transient),
            )
            .await;
        match sent {
            Ok(_) => {
                debug!(
                    event_type,
                    recipients = recipients.len(),
                    "sent plaintext to-device"
                );
                Ok(())
            }
            Err(e) => Err(MatrixError::ToDeviceFailed {
                event_type: event_type.to_owned(),
                failed: recipients,
                reason: MatrixError::http(what, e).to_string(),
            }),
        }
    }

    /// Sends call signalling: Olm-encrypted with `encrypt` (see
    /// [`MatrixSession::send_olm_or_plaintext`]), else plaintext; says how
    /// each recipient got it.
    pub async fn send_signalling(
        &self,
        event_type: &str,
        messages: Vec<(String, String, Value)>,
        encrypt: bool,
        keyless: KeylessDevices,
    ) -> SendReport {
        if encrypt {
            return self
                .send_olm_or_plaintext(event_type, messages, keyless)
                .await;
        }
        let to: Vec<(String, String)> = messages
            .iter()
            .map(|(u, d, _)| (u.clone(), d.clone()))
            .collect();
        match self.send_to_device(event_type, messages, false).await {
            Ok(()) => SendReport {
                plaintext_chosen: to,
                ..SendReport::default()
            },
            Err(e) => SendReport {
                error: Some(e),
                ..SendReport::default()
            },
        }
    }

    /// Sends a to-device event to each `(user_id, device_id, content)`,
    /// Olm-encrypted to every device that has published keys; what happens
    /// to a device without keys `keyless` says. Devices with keys get their
    /// messages in encrypted requests (one per distinct content), keyless
    /// ones all together in one plaintext request. `device_id` `*` (all of
    /// a user's devices) reaches only the devices with keys.
    ///
    /// A device we have no keys for is looked up with `/keys/query`; a
    /// device found keyless is asked about again after a short while
    /// (15 s) or with the next `m.call.invite` to it, so that a device that
    /// publishes keys later gets Olm from then on.
    pub async fn send_olm_or_plaintext(
        &self,
        event_type: &str,
        messages: Vec<(String, String, Value)>,
        keyless: KeylessDevices,
    ) -> SendReport {
        let mut report = SendReport::default();
        let mut failed: Vec<(String, String)> = Vec::new();
        let mut reasons: Vec<String> = Vec::new();

        // Resolve recipients to devices, grouped by identical content.
        let mut groups: HashMap<String, (Value, Vec<Device>)> = HashMap::new();
        let mut plain: Vec<(String, String, Value)> = Vec::new();
        for (user, device, content) in messages {
            let user_id = match Self::parse_user_id(&user) {
                Ok(u) => u,
                Err(e) => {
                    failed.push((user.clone(), device.clone()));
                    reasons.push(e.to_string());
                    continue;
                }
            };
            match self.recipient(&user_id, &device, event_type).await {
                Ok(Recipient::Devices(devices)) => {
                    report.encrypted.push((user, device));
                    let key = content.to_string();
                    let entry = groups.entry(key).or_insert_with(|| (content, Vec::new()));
                    entry.1.extend(devices);
                }
                Ok(Recipient::Keyless) if device == "*" => {
                    failed.push((user.clone(), device.clone()));
                    reasons.push(format!("no device of {user} has published keys"));
                }
                Ok(Recipient::Keyless) => match keyless {
                    KeylessDevices::Plaintext => plain.push((user, device, content)),
                    KeylessDevices::Refuse => report.refused_no_keys.push((user, device)),
                },
                Err(e) => {
                    failed.push((user.clone(), device.clone()));
                    reasons.push(e.to_string());
                }
            }
        }

        for (content, devices) in groups.into_values() {
            if let Err(e) = self
                .send_encrypted_group(event_type, content, devices)
                .await
            {
                match e {
                    MatrixError::ToDeviceFailed {
                        failed: f, reason, ..
                    } => {
                        failed.extend(f);
                        reasons.push(reason);
                    }
                    other => reasons.push(other.to_string()),
                }
            }
        }
        report.encrypted.retain(|r| !failed.iter().any(|f| f == r));

        if !plain.is_empty() {
            let recipients: Vec<(String, String)> = plain
                .iter()
                .map(|(u, d, _)| (u.clone(), d.clone()))
                .collect();
            match self.send_plain(event_type, plain).await {
                Ok(()) => report.plaintext_no_keys = recipients,
                Err(MatrixError::ToDeviceFailed {
                    failed: f, reason, ..
                }) => {
                    failed.extend(f);
                    reasons.push(reason);
                }
                Err(other) => {
                    failed.extend(recipients);
                    reasons.push(other.to_string());
                }
            }
        }

        if !failed.is_empty() {
            reasons.dedup();
            report.error = Some(MatrixError::ToDeviceFailed {
                event_type: event_type.to_owned(),
                failed,
                reason: reasons.join("; "),
            });
        }
        report
    }

    async fn send_encrypted(
        &self,
        event_type: &str,
        messages: Vec<(String, String, Value)>,
    ) -> Result<(), MatrixError> {
        let report = self
            .send_olm_or_plaintext(event_type, messages, KeylessDevices::Refuse)
            .await;
        if report.refused_no_keys.is_empty() {
            return report.error.map_or(Ok(()), Err);
        }
        let mut reasons: Vec<String> = report
            .refused_no_keys
            .iter()
            .map(|(u, d)| format!("no published keys for device {d} of {u}"))
            .collect();
        let mut failed = report.refused_no_keys;
        if let Some(MatrixError::ToDeviceFailed {
            failed: f, reason, ..
        }) = report.error
        {
            failed.extend(f);
            reasons.push(reason);
        }
        Err(MatrixError::ToDeviceFailed {
            event_type: event_type.to_owned(),
            failed,
            reason: reasons.join("; "),
        })
    }

    /// Encrypts one content for `devices` and sends it, retrying the
    /// devices that failed.
    async fn send_encrypted_group(
        &self,
        event_type: &str,
        content: Value,
        devices: Vec<Device>,
    ) -> Result<(), MatrixError> {
        let raw = to_device_content(&content)?;
        let what = format!("encrypting to-device {event_type}");
        // matrix-sdk sends the encrypted requests with its own short retry
        // (not configurable): devices it still failed are reported, not
        // retried on top. Errors before sending (claiming one-time keys,
        // the store) go through our policy.
        let result = retry::REQUEST
            .run(
                &what,
                || async {
                    self.client
                        .encryption()
                        .encrypt_and_send_raw_to_device(
                            devices.iter().collect(),
                            event_type,
                            raw.clone(),
                            Default::default(),
                        )
                        .await
                        .map_err(|e| MatrixError::sdk(what.clone(), e))
                },
                retry::classify_matrix,
            )
            .await;
        let (failed, reason) = match result {
            Ok(f) if f.is_empty() => {
                debug!(
                    event_type,
                    devices = devices.len(),
                    "sent encrypted to-device"
                );
                return Ok(());
            }
            Ok(f) => (
                f.iter()
                    .map(|(u, d)| (u.to_string(), d.to_string()))
                    .collect(),
                "could not establish an Olm session or send".to_owned(),
            ),
            Err(e) => (
                devices
                    .iter()
                    .map(|d| (d.user_id().to_string(), d.device_id().to_string()))
                    .collect(),
                e.to_string(),
            ),
        };
        warn!(
            event_type,
            ?failed,
            reason,
            "encrypted to-device send failed"
        );
        Err(MatrixError::ToDeviceFailed {
            event_type: event_type.to_owned(),
            failed,
            reason,
        })
    }

    /// The devices with keys a recipient names, or [`Recipient::Keyless`].
    /// A device unknown to the store has its user's keys queried, unless it
    /// was found keyless less than [`KEYLESS_RECHECK`] ago and this is not
    /// an invite.
    async fn recipient(
        &self,
        user_id: &OwnedUserId,
        device: &str,
        event_type: &str,
    ) -> Result<Recipient, MatrixError> {
        if device == "*" {
            let found = self.recipient_devices(user_id, device).await?;
            return Ok(if found.is_empty() {
                Recipient::Keyless
            } else {
                Recipient::Devices(found)
            });
        }
        let found = self.known_devices(user_id, device).await?;
        if !found.is_empty() {
            return Ok(Recipient::Devices(found));
        }
        let key = (user_id.clone(), OwnedDeviceId::from(device));
        let checked = self.keyless_checked(&key);
        if event_type != INVITE && checked.is_some_and(|t| t.elapsed() < KEYLESS_RECHECK) {
            return Ok(Recipient::Keyless);
        }
        let found = self.recipient_devices(user_id, device).await?;
        let mut cache = self.keyless.lock().unwrap_or_else(|e| e.into_inner());
        if found.is_empty() {
            if checked.is_none() {
                debug!(%user_id, device, "device has published no keys");
            }
            cache.insert(key, Instant::now());
            Ok(Recipient::Keyless)
        } else {
            if cache.remove(&key).is_some() {
                debug!(%user_id, device, "device has published keys now");
            }
            Ok(Recipient::Devices(found))
        }
    }

    fn keyless_checked(&self, key: &(OwnedUserId, OwnedDeviceId)) -> Option<Instant> {
        self.keyless
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .copied()
    }

    /// The devices a recipient names (`*`: all the user's devices), asking
    /// the homeserver for the user's keys when we do not know them.
    async fn recipient_devices(
        &self,
        user_id: &OwnedUserId,
        device: &str,
    ) -> Result<Vec<Device>, MatrixError> {
        let found = self.known_devices(user_id, device).await?;
        if !found.is_empty() {
            return Ok(found);
        }
        debug!(%user_id, device, "device unknown; querying keys");
        let what = format!("querying the keys of {user_id}");
        retry::REQUEST
            .run(
                &what,
                || async {
                    self.client
                        .encryption()
                        .request_user_identity(user_id)
                        .await
                        .map_err(|e| MatrixError::sdk(what.clone(), e))
                },
                retry::classify_matrix,
            )
            .await?;
        self.known_devices(user_id, device).await
    }

    async fn known_devices(
        &self,
        user_id: &OwnedUserId,
        device: &str,
    ) -> Result<Vec<Device>, MatrixError> {
        let enc = self.client.encryption();
        if device == "*" {
            let devices = enc
                .get_user_devices(user_id)
                .await
                .map_err(|e| MatrixError::sdk(format!("listing the devices of {user_id}"), e))?;
            Ok(devices
                .devices()
                .filter(|d| {
                    Some(d.device_id()) != self.client.device_id() || d.user_id() != self.user_id
                })
                .collect())
        } else {
            let device_id = OwnedDeviceId::from(device);
            let found =
                enc.get_device(user_id, &device_id)
                    .await
                    .map_err(|e| MatrixError::Sdk {
                        action: format!("looking up device {device} of {user_id}"),
                        source: Box::new(e.into()),
                    })?;
            Ok(found.into_iter().collect())
        }
    }
}

fn to_device_content(content: &Value) -> Result<Raw<AnyToDeviceEventContent>, MatrixError> {
    Raw::new(content)
        .map(Raw::cast_unchecked)
        .map_err(|e| MatrixError::invalid("to-device content", &content.to_string(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to(d: &str) -> (String, String) {
        ("@bea:localhost".to_owned(), d.to_owned())
    }

    #[test]
    fn send_modes_report_first_time_and_changes_only() {
        let mut modes = SendModes::default();
        let keyless = SendReport {
            plaintext_no_keys: vec![to("BEA")],
            encrypted: vec![to("*")],
            ..SendReport::default()
        };
        let c = modes.changes(&keyless, "m.call.invite");
        assert_eq!(c.len(), 1, "{c:?}");
        assert!(!c[0].encrypted && !c[0].refused && c[0].device_id == "BEA");
        assert!(
            c[0].reason
                .as_deref()
                .is_some_and(|r| r.contains("no keys"))
        );
        assert!(modes.changes(&keyless, "m.call.candidates").is_empty());

        // The device published keys: Olm from then on, reported once.
        let olm = SendReport {
            encrypted: vec![to("BEA")],
            ..SendReport::default()
        };
        let c = modes.changes(&olm, "m.call.invite");
        assert_eq!(c.len(), 1);
        assert!(c[0].encrypted && c[0].reason.is_none());
        assert!(modes.changes(&olm, "m.call.hangup").is_empty());

        let refused = SendReport {
            refused_no_keys: vec![to("OTHER")],
            ..SendReport::default()
        };
        let c = modes.changes(&refused, "m.call.invite");
        assert_eq!(c.len(), 1);
        assert!(!c[0].encrypted && c[0].refused && c[0].device_id == "OTHER");
        assert!(modes.changes(&refused, "m.call.invite").is_empty());
    }
}
