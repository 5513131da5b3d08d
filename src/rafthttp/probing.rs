//! Health probing (etcd `probing_status.go` with `xiang90/probing`): every peer is
//! asked `GET /raft/probing` every [`PROBE_INTERVAL`]; the answer is
//! `{"OK":true,"Now":"<RFC 3339 time>"}`. The round trip is kept for status
//! reports. As in etcd, probing never affects raft.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::http::{Method, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::peer_status::PeerStatus;
use super::urlpick::UrlPicker;
use super::util::{DIAL_TIMEOUT, raft_request};

/// etcd probes every `ConnReadTimeout - 1s`.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(4);

#[derive(serde::Serialize, serde::Deserialize)]
pub struct Health {
    #[serde(rename = "OK")]
    pub ok: bool,
    #[serde(rename = "Now")]
    pub now: String,
}

/// The `GET /raft/probing` handler.
pub async fn handler() -> Json<Health> {
    Json(Health {
        ok: true,
        now: rfc3339_nano(SystemTime::now()),
    })
}

/// Probes the peer until `stop` is cancelled, the first time right away.
pub async fn run(
    shared: Arc<Shared>,
    peer: u64,
    picker: Arc<UrlPicker>,
    status: Arc<PeerStatus>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let url = picker.pick();
        let rtt = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            r = probe(&shared, &url) => r,
        };
        if rtt.is_none() {
            tracing::debug!(peer = %format_args!("{peer:x}"), url, "probe failed");
        }
        status.record_probe(rtt);
    }
}

/// One probe: the round-trip time of a healthy answer, or `None`.
async fn probe(s: &Shared, url: &str) -> Option<Duration> {
    let req = raft_request(Method::GET, url, "/raft/probing", &s.id_hex, &s.cluster_hex)
        .ok()?
        .body(Empty::new().boxed())
        .ok()?;
    let start = Instant::now();
    let fut = async {
        let resp = s.client.request(req).await.ok()?;
        if resp.status() != StatusCode::OK {
            return None;
        }
        let body = Limited::new(resp.into_body(), 4096)
            .collect()
            .await
            .ok()?
            .to_bytes();
        let h: Health = serde_json::from_slice(&body).ok()?;
        h.ok.then(|| start.elapsed())
    };
    tokio::time::timeout(DIAL_TIMEOUT, fut).await.ok().flatten()
}

/// `t` as Go's `time.RFC3339Nano` in UTC: trailing zeros of the fraction dropped.
pub fn rfc3339_nano(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    let mut s = format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    );
    let nanos = d.subsec_nanos();
    if nanos > 0 {
        let frac = format!("{nanos:09}");
        s.push('.');
        s.push_str(frac.trim_end_matches('0'));
    }
    s.push('Z');
    s
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_like_go() {
        assert_eq!(rfc3339_nano(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 120_000_000);
        assert_eq!(rfc3339_nano(t), "2023-11-14T22:13:20.12Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400); // leap day
        assert_eq!(rfc3339_nano(t), "2000-02-29T00:00:00Z");
    }
}
