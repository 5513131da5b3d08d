//! Which of a peer's URLs to use (etcd `urlpick.go`): stick to one until it fails,
//! then move on to the next, so a member with several addresses survives one dying.

use std::sync::Mutex;

/// A sticky, rotating choice among a peer's URLs. Shared by the peer's pipeline,
/// stream readers, snapshot sender and prober.
#[derive(Debug)]
pub struct UrlPicker {
    inner: Mutex<Picked>,
}

#[derive(Debug)]
struct Picked {
    urls: Vec<String>,
    picked: usize,
}

impl UrlPicker {
    pub fn new(urls: &[String]) -> UrlPicker {
        UrlPicker {
            inner: Mutex::new(Picked {
                urls: normalize(urls),
                picked: 0,
            }),
        }
    }

    /// The URL to use now, without a trailing slash; empty if the peer has none.
    pub fn pick(&self) -> String {
        let p = self.lock();
        p.urls.get(p.picked).cloned().unwrap_or_default()
    }

    /// Replaces the URL set (etcd `update`), starting again from the first.
    pub fn update(&self, urls: &[String]) {
        let mut p = self.lock();
        p.urls = normalize(urls);
        p.picked = 0;
    }

    /// Reports `url` as failing: if it is still the current pick, move to the next.
    /// A report about an older pick is ignored, so concurrent failures of the same
    /// URL advance the pick only once.
    pub fn unreachable(&self, url: &str) {
        let mut p = self.lock();
        if !p.urls.is_empty() && p.urls[p.picked] == url {
            p.picked = (p.picked + 1) % p.urls.len();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Picked> {
        // A panic elsewhere while holding this lock cannot leave `Picked` torn
        // (every write is a single assignment), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn normalize(urls: &[String]) -> Vec<String> {
    urls.iter()
        .map(|u| u.trim().trim_end_matches('/').to_string())
        .filter(|u| !u.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sticks_until_unreachable_then_rotates() {
        let urls = vec!["http://a:1/".to_string(), "http://b:2".to_string()];
        let p = UrlPicker::new(&urls);
        assert_eq!(p.pick(), "http://a:1");
        p.unreachable("http://b:2"); // not the current pick: ignored
        assert_eq!(p.pick(), "http://a:1");
        p.unreachable("http://a:1");
        assert_eq!(p.pick(), "http://b:2");
        p.unreachable("http://b:2");
        assert_eq!(p.pick(), "http://a:1");
        p.update(&["http://c:3".to_string()]);
        assert_eq!(p.pick(), "http://c:3");
        p.update(&[]);
        assert_eq!(p.pick(), "");
        p.unreachable("");
    }
}
