//! Reading metrics in tests: from a registry in this process, or from the
//! text a child process serves on `/metrics`.

/// Sum of a metric's samples whose labels include `labels`: counters and
/// gauges by value, histograms by sample count. 0 when nothing matches.
pub fn registry_value(prom: &prometheus::Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut total = 0.0;
    for fam in prom.gather() {
        if fam.name() != name {
            continue;
        }
        for m in fam.get_metric() {
            let ok = labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            });
            if !ok {
                continue;
            }
            total += match fam.get_field_type() {
                prometheus::proto::MetricType::COUNTER => m.get_counter().get_value(),
                prometheus::proto::MetricType::GAUGE => m.get_gauge().get_value(),
                _ => m.get_histogram().get_sample_count() as f64,
            };
        }
    }
    total
}

/// Sum of the samples of `name` in Prometheus text whose labels include
/// `labels`; `None` when there is no such sample. For a histogram, ask for
/// `<name>_count` or `<name>_sum`.
pub fn scraped_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.trim().rsplit_once(' ') else {
            continue;
        };
        let (metric, label_text) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.strip_suffix('}').unwrap_or(rest)),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        let has = |k: &str, v: &str| {
            label_text
                .split(',')
                .any(|pair| pair.trim() == format!("{k}=\"{v}\""))
        };
        if !labels.iter().all(|(k, v)| has(k, v)) {
            continue;
        }
        if let Ok(v) = value.parse::<f64>() {
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scraped_samples_are_matched_by_name_and_labels() {
        let text = "# HELP t x\n# TYPE t counter\n\
                    t{task=\"a\",outcome=\"ok\"} 2\n\
                    t{task=\"b\",outcome=\"ok\"} 3\n\
                    t_other 7\n\
                    u 1.5\n";
        assert_eq!(scraped_value(text, "t", &[]), Some(5.0));
        assert_eq!(scraped_value(text, "t", &[("task", "b")]), Some(3.0));
        assert_eq!(scraped_value(text, "t", &[("task", "c")]), None);
        assert_eq!(scraped_value(text, "u", &[]), Some(1.5));
        assert_eq!(scraped_value(text, "t_oth", &[]), None);
    }

    #[test]
    fn registry_values_sum_matching_samples() {
        let prom = prometheus::Registry::new();
        let c = prometheus::IntCounterVec::new(prometheus::Opts::new("c", "c"), &["task"])
            .expect("metric");
        prom.register(Box::new(c.clone())).expect("register");
        c.with_label_values(&["a"]).inc_by(2);
        c.with_label_values(&["b"]).inc();
        assert_eq!(registry_value(&prom, "c", &[]), 3.0);
        assert_eq!(registry_value(&prom, "c", &[("task", "a")]), 2.0);
        assert_eq!(registry_value(&prom, "missing", &[]), 0.0);
    }
}
