//! The metrics exposition both binaries serve on `GET /metrics`: OpenMetrics for clients
//! that ask for it, the Prometheus text format otherwise (what `promtool check metrics`
//! reads).

/// The `Content-Type` of an OpenMetrics exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The `Content-Type` of the Prometheus text format (for clients that do not ask for
/// OpenMetrics, and for `promtool check metrics`).
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The OpenMetrics exposition in the Prometheus text format: a counter family is named
/// with its `_total` suffix in `# HELP` and `# TYPE`, and there is no `# EOF`.
pub fn prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Whether a request's `Accept` header asks for OpenMetrics.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| a.contains("application/openmetrics-text"))
}

/// The content type and body to answer with, from an OpenMetrics exposition.
pub fn body(openmetrics: String, wants_openmetrics: bool) -> (&'static str, String) {
    if wants_openmetrics {
        (CONTENT_TYPE, openmetrics)
    } else {
        (PROMETHEUS_CONTENT_TYPE, prometheus_text(&openmetrics))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_get_their_suffix_and_the_eof_goes() {
        let om = "# HELP zm_blocks Blocks.\n# TYPE zm_blocks counter\nzm_blocks_total 1\n\
                  # HELP zm_up Up.\n# TYPE zm_up gauge\nzm_up 1\n# EOF\n";
        let (ctype, text) = body(om.to_string(), false);
        assert_eq!(ctype, PROMETHEUS_CONTENT_TYPE);
        assert_eq!(
            text,
            "# HELP zm_blocks_total Blocks.\n# TYPE zm_blocks_total counter\nzm_blocks_total 1\n\
             # HELP zm_up Up.\n# TYPE zm_up gauge\nzm_up 1\n"
        );
        assert_eq!(body(om.to_string(), true), (CONTENT_TYPE, om.to_string()));
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
        )));
        assert!(!wants_openmetrics(Some("*/*")) && !wants_openmetrics(None));
    }
}
