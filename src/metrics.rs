//! What the supervisor's and the controller's `/metrics` share: an exposition built at scrape
//! time from a snapshot of figures, encoded by `prometheus-client` in the Prometheus text format
//! (0.0.4, what Prometheus and `promtool check metrics` read), and the HTTP server that serves it.
//!
//! Figures are snapshots (counters kept by each service, or asked of the pagers over gRPC), so
//! the exposition is a `prometheus_client` [`Collector`] over values gathered just before: the
//! library writes names, types, help, labels and escaping; this module only says what to write.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

pub use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Label pairs of one sample, in order.
pub type Labels = Vec<(String, String)>;

/// Builds label pairs from `(&str, value)` pairs.
pub fn labels<const N: usize>(pairs: [(&str, &str); N]) -> Labels {
    pairs.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())).collect()
}

/// One histogram sample: cumulative bucket counts by upper bound, sum and count.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistogramValue {
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
    pub count: u64,
}

#[derive(Debug, Clone, PartialEq)]
enum Samples {
    Counter(Vec<(Labels, u64)>),
    Gauge(Vec<(Labels, i64)>),
    Histogram(Vec<(Labels, HistogramValue)>),
}

#[derive(Debug, Clone, PartialEq)]
struct Family {
    name: &'static str,
    help: &'static str,
    samples: Samples,
}

/// The metric families of one scrape, in the order they were first named.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Exposition {
    families: Vec<Family>,
}

impl Exposition {
    fn family(&mut self, name: &'static str, help: &'static str, empty: Samples) -> &mut Samples {
        let i = match self.families.iter().position(|f| f.name == name) {
            Some(i) => i,
            None => {
                self.families.push(Family { name, help, samples: empty });
                self.families.len() - 1
            }
        };
        &mut self.families[i].samples
    }

    /// Declares a counter family with no sample yet (so it is listed even at zero samples).
    pub fn declare_counter(&mut self, name: &'static str, help: &'static str) {
        self.family(name, help, Samples::Counter(Vec::new()));
    }

    /// Adds a counter sample. `name` without `_total` (the encoder appends it).
    pub fn counter(&mut self, name: &'static str, help: &'static str, labels: Labels, value: u64) {
        if let Samples::Counter(v) = self.family(name, help, Samples::Counter(Vec::new())) {
            v.push((labels, value));
        }
    }

    /// Adds a gauge sample.
    pub fn gauge(&mut self, name: &'static str, help: &'static str, labels: Labels, value: i64) {
        if let Samples::Gauge(v) = self.family(name, help, Samples::Gauge(Vec::new())) {
            v.push((labels, value));
        }
    }

    /// Adds a histogram sample.
    pub fn histogram(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: Labels,
        value: HistogramValue,
    ) {
        if let Samples::Histogram(v) = self.family(name, help, Samples::Histogram(Vec::new())) {
            v.push((labels, value));
        }
    }

    /// The Prometheus text format of these families.
    pub fn encode(self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)
            .expect("writing to a String cannot fail");
        text
    }
}

impl Collector for Exposition {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.families {
            match &f.samples {
                Samples::Counter(samples) => {
                    let mut m =
                        encoder.encode_descriptor(f.name, f.help, None, MetricType::Counter)?;
                    for (labels, v) in samples {
                        m.encode_family(labels)?.encode_counter::<NoLabelSet, u64, u64>(v, None)?;
                    }
                }
                Samples::Gauge(samples) => {
                    let mut m =
                        encoder.encode_descriptor(f.name, f.help, None, MetricType::Gauge)?;
                    for (labels, v) in samples {
                        m.encode_family(labels)?.encode_gauge(v)?;
                    }
                }
                Samples::Histogram(samples) => {
                    let mut m =
                        encoder.encode_descriptor(f.name, f.help, None, MetricType::Histogram)?;
                    for (labels, h) in samples {
                        m.encode_family(labels)?
                            .encode_histogram::<NoLabelSet>(h.sum, h.count, &h.buckets, None)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Counters of events by label values, kept by a service between scrapes (e.g. handshake
/// refusals by reason). Cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub struct LabeledCounter {
    counts: Arc<Mutex<BTreeMap<Vec<String>, u64>>>,
}

impl LabeledCounter {
    /// Counts one event with these label values.
    pub fn inc(&self, values: &[&str]) {
        let key = values.iter().map(|v| (*v).to_string()).collect();
        *self.counts.lock().unwrap_or_else(|p| p.into_inner()).entry(key).or_insert(0) += 1;
    }

    /// The count for these label values (0 if never counted).
    pub fn get(&self, values: &[&str]) -> u64 {
        let key: Vec<String> = values.iter().map(|v| (*v).to_string()).collect();
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).get(&key).copied().unwrap_or(0)
    }

    /// Writes every count as a sample of counter `name`, labelled `keys` (one per value).
    pub fn write(
        &self,
        out: &mut Exposition,
        name: &'static str,
        help: &'static str,
        keys: &[&str],
    ) {
        out.declare_counter(name, help);
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for (values, n) in counts {
            let labels =
                keys.iter().zip(values).map(|(k, v)| ((*k).to_string(), v)).collect::<Labels>();
            out.counter(name, help, labels, n);
        }
    }
}

/// Renders the exposition of one scrape.
pub type Render = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;

/// Why the metrics server did not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("listening on {addr} for /metrics: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// Serves `GET /metrics` (anything else: 404) on `addr` until `stop` turns true. Returns the
/// bound address (port 0 picks a free one) and the server's task.
pub async fn serve(
    addr: SocketAddr,
    render: Render,
    mut stop: watch::Receiver<bool>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>), ServeError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let bound = listener.local_addr().map_err(|source| ServeError::Bind { addr, source })?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = Arc::clone(&render);
            async move { ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], render().await) }
        }),
    );
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
    });
    Ok((bound, task))
}

/// `MemAvailable` of `/proc/meminfo`, in bytes.
pub fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exposition_is_written_in_the_prometheus_text_format() {
        let mut e = Exposition::default();
        e.counter("uffd_x", "Xs.", labels([("version", "v1")]), 3);
        e.gauge("uffd_y", "Ys.", labels([("state", "serving"), ("version", "v1")]), 2);
        e.histogram(
            "uffd_z_seconds",
            "Zs.",
            labels([("version", "v1")]),
            HistogramValue { buckets: vec![(0.5, 1), (1.0, 2)], sum: 1.25, count: 3 },
        );
        let text = e.encode();
        assert!(text.contains("# TYPE uffd_x_total counter\n"), "{text}");
        assert!(text.contains("uffd_x_total{version=\"v1\"} 3\n"), "{text}");
        assert!(text.contains("uffd_y{state=\"serving\",version=\"v1\"} 2\n"), "{text}");
        assert!(text.contains("uffd_z_seconds_bucket{version=\"v1\",le=\"+Inf\"} 3\n"), "{text}");
        assert!(text.contains("uffd_z_seconds_count{version=\"v1\"} 3\n"), "{text}");
        assert!(!text.contains("# EOF"), "{text}");
    }

    #[test]
    fn labeled_counters_count_by_values() {
        let c = LabeledCounter::default();
        c.inc(&["bad_json"]);
        c.inc(&["bad_json"]);
        c.inc(&["no_fd"]);
        assert_eq!(c.get(&["bad_json"]), 2);
        assert_eq!(c.get(&["other"]), 0);
        let mut e = Exposition::default();
        c.write(&mut e, "uffd_refusals", "Refusals.", &["reason"]);
        let text = e.encode();
        assert!(text.contains("uffd_refusals_total{reason=\"bad_json\"} 2\n"), "{text}");
    }

    #[test]
    fn mem_available_is_read_in_bytes() {
        let m = "MemTotal:       16384 kB\nMemFree:  100 kB\nMemAvailable:    2048 kB\n";
        assert_eq!(parse_mem_available(m), Some(2048 * 1024));
        assert_eq!(parse_mem_available("MemTotal: 1 kB\n"), None);
    }
}
