//! TensorBoard event files, as `torch.utils.tensorboard.SummaryWriter` writes them: TFRecord
//! framing (length, masked CRC-32C of the length, the record, masked CRC-32C of the record)
//! around `tensorflow.Event` protocol buffers, the first one carrying `brain.Event:2`.
//! W&B users import them with `wandb sync --sync-tensorboard`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

/// Writes one `events.out.tfevents.*` file.
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// A new event file in `dir` (created), named as TensorBoard looks for it.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("failed to create {}", dir.display()))?;
        let now = wall_time();
        let host = hostname();
        let path = dir.join(format!("events.out.tfevents.{}.{host}", now as u64));
        let file =
            File::create(&path).with_context(|| format!("failed to create {}", path.display()))?;
        let mut writer = EventWriter {
            path,
            out: BufWriter::new(file),
        };
        let mut event = Vec::new();
        proto::double(&mut event, 1, now);
        proto::bytes(&mut event, 3, b"brain.Event:2");
        writer.record(&event)?;
        writer.flush()?;
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One event holding a scalar summary per `(tag, value)`, at `step`.
    pub fn scalars(&mut self, step: u64, values: &[(String, f64)]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        let mut summary = Vec::new();
        for (tag, value) in values {
            let mut v = Vec::new();
            proto::bytes(&mut v, 1, tag.as_bytes());
            proto::float(&mut v, 2, *value as f32);
            proto::bytes(&mut summary, 1, &v);
        }
        let mut event = Vec::new();
        proto::double(&mut event, 1, wall_time());
        proto::varint_field(&mut event, 2, step);
        proto::bytes(&mut event, 5, &summary);
        self.record(&event)
    }

    /// A text summary (TensorBoard's Text tab), as HF logs its arguments under `args`.
    pub fn text(&mut self, step: u64, tag: &str, text: &str) -> Result<()> {
        // TensorProto{dtype: DT_STRING (7), tensor_shape: {}, string_val: [text]}.
        let mut tensor = Vec::new();
        proto::varint_field(&mut tensor, 1, 7);
        proto::bytes(&mut tensor, 2, &[]);
        proto::bytes(&mut tensor, 8, text.as_bytes());
        // SummaryMetadata{plugin_data: {plugin_name: "text"}}.
        let mut plugin = Vec::new();
        proto::bytes(&mut plugin, 1, b"text");
        let mut metadata = Vec::new();
        proto::bytes(&mut metadata, 1, &plugin);
        let mut value = Vec::new();
        proto::bytes(&mut value, 1, tag.as_bytes());
        proto::bytes(&mut value, 9, &metadata);
        proto::bytes(&mut value, 8, &tensor);
        let mut summary = Vec::new();
        proto::bytes(&mut summary, 1, &value);
        let mut event = Vec::new();
        proto::double(&mut event, 1, wall_time());
        proto::varint_field(&mut event, 2, step);
        proto::bytes(&mut event, 5, &summary);
        self.record(&event)
    }

    pub fn flush(&mut self) -> Result<()> {
        self.out
            .flush()
            .with_context(|| format!("failed to write {}", self.path.display()))
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut framed = Vec::with_capacity(data.len() + 16);
        framed.extend_from_slice(&len);
        framed.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
        framed.extend_from_slice(data);
        framed.extend_from_slice(&masked_crc32c(data).to_le_bytes());
        self.out
            .write_all(&framed)
            .with_context(|| format!("failed to write {}", self.path.display()))
    }
}

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| {
            !h.is_empty()
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
        })
        .unwrap_or_else(|| "localhost".into())
}

/// CRC-32C (Castagnoli), as TFRecord frames records with it.
fn crc32c(data: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut crc = i as u32;
            let mut bit = 0;
            while bit < 8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0x82f6_3b78
                } else {
                    crc >> 1
                };
                bit += 1;
            }
            table[i] = crc;
            i += 1;
        }
        table
    };
    !data.iter().fold(!0u32, |crc, b| {
        TABLE[((crc ^ u32::from(*b)) & 0xff) as usize] ^ (crc >> 8)
    })
}

/// TFRecord's masking of a CRC, so that CRCs of data holding CRCs stay well distributed.
fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Just enough protocol-buffer encoding for `Event` and `Summary`.
mod proto {
    pub fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
        varint(out, (u64::from(field) << 3) | u64::from(wire));
    }

    pub fn varint_field(out: &mut Vec<u8>, field: u32, v: u64) {
        key(out, field, 0);
        varint(out, v);
    }

    pub fn double(out: &mut Vec<u8>, field: u32, v: f64) {
        key(out, field, 1);
        out.extend_from_slice(&v.to_le_bytes());
    }

    pub fn float(out: &mut Vec<u8>, field: u32, v: f32) {
        key(out, field, 5);
        out.extend_from_slice(&v.to_le_bytes());
    }

    pub fn bytes(out: &mut Vec<u8>, field: u32, data: &[u8]) {
        key(out, field, 2);
        varint(out, data.len() as u64);
        out.extend_from_slice(data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    /// Reads the framing back and checks every CRC: what TensorBoard's reader does first.
    #[test]
    fn records_are_framed_with_valid_masked_crcs() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.scalars(3, &[("train/loss".into(), 1.5)]).unwrap();
        w.flush().unwrap();
        let bytes = std::fs::read(w.path()).unwrap();
        let mut at = 0;
        let mut records = Vec::new();
        while at < bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
            let len_crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
            assert_eq!(len_crc, masked_crc32c(&bytes[at..at + 8]));
            let data = &bytes[at + 12..at + 12 + len];
            let crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
            assert_eq!(crc, masked_crc32c(data));
            records.push(data.to_vec());
            at += 16 + len;
        }
        assert_eq!(records.len(), 2);
        assert!(records[0].windows(13).any(|w| w == b"brain.Event:2"));
        assert!(records[1].windows(10).any(|w| w == b"train/loss"));
        assert!(records[1].windows(4).any(|w| w == 1.5f32.to_le_bytes()));
    }
}
