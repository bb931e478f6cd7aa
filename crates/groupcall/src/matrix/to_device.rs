//! Sending to-device messages, plaintext or Olm-encrypted.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use matrix_sdk::encryption::identities::Device;
use matrix_sdk::ruma::api::client::to_device::send_event_to_device::v3::{
    Messages, Request as SendToDeviceRequest,
};
use matrix_sdk::ruma::events::{AnyToDeviceEventContent, ToDeviceEventType};
use matrix_sdk::ruma::serde::Raw;
use matrix_sdk::ruma::to_device::DeviceIdOrAllDevices;
use matrix_sdk::ruma::{OwnedDeviceId, OwnedUserId, TransactionId};
use serde_json::Value;
use tracing::{debug, warn};

use super::{MatrixError, MatrixSession};

/// Attempts per send (first try included).
const ATTEMPTS: u32 = 4;
const FIRST_RETRY_DELAY: Duration = Duration::from_millis(200);

impl MatrixSession {
    /// Sends a to-device event to each `(user_id, device_id, content)`.
    ///
    /// Plaintext: one `sendToDevice` request carries all recipients
    /// (`device_id` `*` means all of the user's devices). Encrypted: each
    /// recipient device gets its content Olm-encrypted (devices that share a
    /// content are encrypted and sent together); devices we do not know yet
    /// are looked up with `/keys/query` first.
    ///
    /// Transient failures are retried a few times with backoff; recipients
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
        let mut delay = FIRST_RETRY_DELAY;
        let mut attempt = 1;
        loop {
            let request = SendToDeviceRequest::new_raw(
                ToDeviceEventType::from(event_type),
                txn_id.clone(),
                map.clone(),
            );
            match self.client.send(request).await {
                Ok(_) => {
                    debug!(
                        event_type,
                        recipients = recipients.len(),
                        "sent plaintext to-device"
                    );
                    return Ok(());
                }
                Err(e) => {
                    let err = MatrixError::http(format!("sending to-device {event_type}"), e);
                    if !err.is_transient() || attempt >= ATTEMPTS {
                        return Err(MatrixError::ToDeviceFailed {
                            event_type: event_type.to_owned(),
                            failed: recipients,
                            reason: err.to_string(),
                        });
                    }
                    warn!(event_type, attempt, error = %err, "to-device send failed; retrying");
                }
            }
            tokio::time::sleep(delay).await;
            delay *= 2;
            attempt += 1;
        }
    }

    async fn send_encrypted(
        &self,
        event_type: &str,
        messages: Vec<(String, String, Value)>,
    ) -> Result<(), MatrixError> {
        let mut failed: Vec<(String, String)> = Vec::new();
        let mut reasons: Vec<String> = Vec::new();

        // Resolve recipients to devices, grouped by identical content.
        let mut groups: HashMap<String, (Value, Vec<Device>)> = HashMap::new();
        for (user, device, content) in messages {
            let user_id = Self::parse_user_id(&user)?;
            let devices = match self.recipient_devices(&user_id, &device).await {
                Ok(d) if !d.is_empty() => d,
                Ok(_) => {
                    failed.push((user.clone(), device.clone()));
                    reasons.push(format!("no published keys for device {device} of {user}"));
                    continue;
                }
                Err(e) => {
                    failed.push((user.clone(), device.clone()));
                    reasons.push(e.to_string());
                    continue;
                }
            };
            let key = content.to_string();
            let entry = groups.entry(key).or_insert_with(|| (content, Vec::new()));
            entry.1.extend(devices);
        }

        for (content, devices) in groups.into_values() {
            let raw = to_device_content(&content)?;
            let mut pending = devices;
            let mut delay = FIRST_RETRY_DELAY;
            let mut attempt = 1;
            loop {
                let result = self
                    .client
                    .encryption()
                    .encrypt_and_send_raw_to_device(
                        pending.iter().collect(),
                        event_type,
                        raw.clone(),
                        Default::default(),
                    )
                    .await;
                let (still_failed, reason) = match result {
                    Ok(f) if f.is_empty() => (Vec::new(), String::new()),
                    Ok(f) => (f, "could not establish an Olm session or send".to_owned()),
                    Err(e) => {
                        let err = MatrixError::sdk(format!("encrypting to-device {event_type}"), e);
                        let ids = pending
                            .iter()
                            .map(|d| (d.user_id().to_owned(), d.device_id().to_owned()))
                            .collect();
                        (ids, err.to_string())
                    }
                };
                if still_failed.is_empty() {
                    debug!(
                        event_type,
                        devices = pending.len(),
                        "sent encrypted to-device"
                    );
                    break;
                }
                if attempt >= ATTEMPTS {
                    failed.extend(
                        still_failed
                            .iter()
                            .map(|(u, d)| (u.to_string(), d.to_string())),
                    );
                    reasons.push(reason);
                    break;
                }
                warn!(event_type, attempt, failed = ?still_failed, reason, "encrypted to-device send failed; retrying");
                pending.retain(|d| {
                    still_failed
                        .iter()
                        .any(|(u, id)| d.user_id() == u && d.device_id() == id)
                });
                tokio::time::sleep(delay).await;
                delay *= 2;
                attempt += 1;
            }
        }

        if failed.is_empty() {
            Ok(())
        } else {
            reasons.dedup();
            Err(MatrixError::ToDeviceFailed {
                event_type: event_type.to_owned(),
                failed,
                reason: reasons.join("; "),
            })
        }
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
        self.client
            .encryption()
            .request_user_identity(user_id)
            .await
            .map_err(|e| MatrixError::sdk(format!("querying the keys of {user_id}"), e))?;
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
