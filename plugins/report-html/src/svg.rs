//! The charts, drawn as inline SVG: each score's mean per run with its 95% interval, and the
//! candidate-minus-baseline differences with theirs.
//!
//! **Invariant:** every coordinate is computed from finite numbers only, so no chart writes
//! `NaN` or `inf`; a value that is not finite is drawn as the text "n/a".

use adapterlab_report_common::{
    NOT_AVAILABLE, Verdict, direction, interval, number, signed, signed_interval,
};
use adapterlab_sdk::reporter::{Delta, Estimate};

use crate::html::escape;

/// Okabe-Ito colours: told apart with the common colour-vision deficiencies.
pub const PALETTE: [&str; 8] = [
    "#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000",
];

/// The colour of run `index`.
pub fn run_colour(index: usize) -> &'static str {
    PALETTE[index % PALETTE.len()]
}

/// A coordinate with one decimal. Callers pass finite values; the guard keeps the invariant
/// even if one did not.
fn px(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.1}")
    } else {
        "0".to_string()
    }
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// The low and high of a linear scale covering `values` and zero, with a little headroom;
/// never empty.
fn domain(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((0.0f64, 0.0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let span = hi - lo;
    // Only finite values reach the fold, so `span` is finite and not negative.
    if span <= 1e-12 {
        return (lo.min(0.0), lo.max(0.0) + 1.0);
    }
    let pad = span * 0.05;
    (
        if lo < 0.0 { lo - pad } else { lo },
        if hi > 0.0 { hi + pad } else { hi },
    )
}

/// One run's bar: its 1-based number under the bar (the legend names it), its name for the
/// tooltip and description, and its estimate if it has this score.
pub struct Bar<'a> {
    pub run: usize,
    pub name: &'a str,
    pub estimate: Option<&'a Estimate>,
}

const BAR_WIDTH: f64 = 32.0;
const BAR_GAP: f64 = 16.0;
const LEFT: f64 = 60.0;
const TOP: f64 = 16.0;
const BOTTOM: f64 = 146.0;
const HEIGHT: f64 = 168.0;

/// A bar chart of one score's mean per run with error bars for the 95% interval. `id` must be
/// unique in the page.
pub fn means_chart(id: &str, score: &str, higher_is_better: bool, bars: &[Bar]) -> String {
    let width = LEFT + bars.len() as f64 * (BAR_WIDTH + BAR_GAP) + BAR_GAP;
    let values = bars
        .iter()
        .filter_map(|b| b.estimate)
        .flat_map(|e| [e.mean, e.low, e.high]);
    let (lo, hi) = domain(values);
    let y = |v: f64| BOTTOM - (v - lo) / (hi - lo) * (BOTTOM - TOP);
    let direction = direction(higher_is_better);

    let description: Vec<String> = bars
        .iter()
        .map(|b| match b.estimate {
            Some(e) => format!("{}: {} {}", b.name, number(e.mean), interval(e)),
            None => format!("{}: {NOT_AVAILABLE}", b.name),
        })
        .collect();
    let mut out = format!(
        "<svg class=\"chart\" role=\"img\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" \
         aria-labelledby=\"{id}-title {id}-desc\">\n\
         <title id=\"{id}-title\">Mean {score} per run with 95% intervals ({direction} is better)</title>\n\
         <desc id=\"{id}-desc\">{desc}</desc>\n",
        w = px(width),
        h = px(HEIGHT),
        score = escape(score),
        desc = escape(&description.join("; ")),
    );
    // Axis with ticks at both ends of the scale and at zero.
    out.push_str(&format!(
        "<line class=\"axis\" x1=\"{x}\" y1=\"{t}\" x2=\"{x}\" y2=\"{b}\"/>\n",
        x = px(LEFT - 4.0),
        t = px(TOP),
        b = px(BOTTOM)
    ));
    let mut ticks = vec![lo, hi];
    if lo < 0.0 && hi > 0.0 {
        ticks.push(0.0);
    }
    for tick in ticks {
        out.push_str(&format!(
            "<text class=\"tick\" x=\"{x}\" y=\"{y}\" text-anchor=\"end\" dominant-baseline=\"middle\">{label}</text>\n",
            x = px(LEFT - 8.0),
            y = px(y(tick)),
            label = number(tick),
        ));
    }
    let zero = y(0.0);
    out.push_str(&format!(
        "<line class=\"baseline\" x1=\"{x1}\" y1=\"{y}\" x2=\"{x2}\" y2=\"{y}\"/>\n",
        x1 = px(LEFT - 4.0),
        x2 = px(width - 4.0),
        y = px(zero)
    ));

    for (slot, bar) in bars.iter().enumerate() {
        let x = LEFT + BAR_GAP / 2.0 + slot as f64 * (BAR_WIDTH + BAR_GAP);
        let centre = x + BAR_WIDTH / 2.0;
        out.push_str(&format!(
            "<text class=\"label\" x=\"{c}\" y=\"{y}\" text-anchor=\"middle\">{n}</text>\n",
            c = px(centre),
            y = px(HEIGHT - 6.0),
            n = bar.run,
        ));
        let Some((estimate, mean)) = bar.estimate.and_then(|e| Some((e, finite(e.mean)?))) else {
            out.push_str(&format!(
                "<text class=\"na\" x=\"{c}\" y=\"{y}\" text-anchor=\"middle\">{NOT_AVAILABLE}</text>\n",
                c = px(centre),
                y = px(zero - 4.0),
            ));
            continue;
        };
        let top = y(mean).min(zero);
        out.push_str(&format!(
            "<rect x=\"{x}\" y=\"{y}\" width=\"{w}\" height=\"{h}\" fill=\"{fill}\"><title>{name}: {mean} {ci}</title></rect>\n",
            x = px(x),
            y = px(top),
            w = px(BAR_WIDTH),
            h = px((y(mean) - zero).abs()),
            fill = run_colour(bar.run - 1),
            name = escape(bar.name),
            mean = number(mean),
            ci = interval(estimate),
        ));
        if let (Some(low), Some(high)) = (finite(estimate.low), finite(estimate.high)) {
            let (y_low, y_high) = (y(low), y(high));
            out.push_str(&format!(
                "<path class=\"error\" d=\"M{l} {yl}H{r}M{c} {yl}V{yh}M{l} {yh}H{r}\"/>\n",
                l = px(centre - 6.0),
                r = px(centre + 6.0),
                c = px(centre),
                yl = px(y_low),
                yh = px(y_high),
            ));
        }
    }
    out.push_str("</svg>\n");
    out
}

const ROW: f64 = 30.0;
const LABEL_WIDTH: f64 = 150.0;
const PLOT_WIDTH: f64 = 280.0;
const DELTA_WIDTH: f64 = 720.0;

/// A forest plot of the differences, one row per score: the mean difference as a dot, its
/// 95% interval as a line, zero as a dashed line. Scores have different ranges, so each row
/// is scaled to its own largest magnitude; the numbers are written beside each row.
pub fn delta_chart(id: &str, deltas: &[Delta]) -> String {
    let header = 22.0;
    let height = header + deltas.len() as f64 * ROW + 8.0;
    let centre = LABEL_WIDTH + PLOT_WIDTH / 2.0;
    let half = PLOT_WIDTH / 2.0 * 0.9;
    let description: Vec<String> = deltas
        .iter()
        .map(|d| {
            format!(
                "{}: {} {}, {}",
                d.score,
                signed(d.difference.mean),
                signed_interval(&d.difference),
                Verdict::of(d).label()
            )
        })
        .collect();
    let mut out = format!(
        "<svg class=\"chart\" role=\"img\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" \
         aria-labelledby=\"{id}-title {id}-desc\">\n\
         <title id=\"{id}-title\">Difference candidate minus baseline per score, with 95% intervals</title>\n\
         <desc id=\"{id}-desc\">{desc}</desc>\n\
         <text class=\"tick\" x=\"{c}\" y=\"12\" text-anchor=\"middle\">0</text>\n\
         <line class=\"zero\" x1=\"{c}\" y1=\"{top}\" x2=\"{c}\" y2=\"{bottom}\"/>\n",
        w = px(DELTA_WIDTH),
        h = px(height),
        desc = escape(&description.join("; ")),
        c = px(centre),
        top = px(header - 6.0),
        bottom = px(height - 4.0),
    );
    for (row, delta) in deltas.iter().enumerate() {
        let mid = header + row as f64 * ROW + ROW / 2.0;
        let verdict = Verdict::of(delta);
        let d = &delta.difference;
        let scale = [d.mean, d.low, d.high]
            .into_iter()
            .filter_map(finite)
            .map(f64::abs)
            .fold(0.0, f64::max);
        let scale = if scale > 0.0 { scale } else { 1.0 };
        let x = |v: f64| centre + v / scale * half;
        out.push_str(&format!(
            "<g class=\"{key}\">\n<text class=\"label\" x=\"{lx}\" y=\"{y}\" dominant-baseline=\"middle\">{name}</text>\n",
            key = verdict.key(),
            lx = px(LABEL_WIDTH - 140.0),
            y = px(mid),
            name = escape(&shorten(&delta.score, 20)),
        ));
        if let (Some(low), Some(high)) = (finite(d.low), finite(d.high)) {
            out.push_str(&format!(
                "<line class=\"interval\" x1=\"{x1}\" y1=\"{y}\" x2=\"{x2}\" y2=\"{y}\"/>\n",
                x1 = px(x(low)),
                x2 = px(x(high)),
                y = px(mid),
            ));
        }
        match finite(d.mean) {
            Some(mean) => out.push_str(&format!(
                "<circle class=\"point\" cx=\"{cx}\" cy=\"{y}\" r=\"5\"/>\n",
                cx = px(x(mean)),
                y = px(mid),
            )),
            None => out.push_str(&format!(
                "<text class=\"na\" x=\"{c}\" y=\"{y}\" text-anchor=\"middle\" dominant-baseline=\"middle\">{NOT_AVAILABLE}</text>\n",
                c = px(centre + 24.0),
                y = px(mid),
            )),
        }
        out.push_str(&format!(
            "<text class=\"value\" x=\"{vx}\" y=\"{y}\" dominant-baseline=\"middle\">{mean} {ci} {label}</text>\n</g>\n",
            vx = px(LABEL_WIDTH + PLOT_WIDTH + 12.0),
            y = px(mid),
            mean = signed(d.mean),
            ci = signed_interval(d),
            label = verdict.label(),
        ));
    }
    out.push_str("</svg>\n");
    out
}

/// `text` cut to `max` characters with an ellipsis, for labels in a fixed space; the full
/// text is in the chart's description.
fn shorten(text: &str, max: usize) -> String {
    match text.char_indices().nth(max.saturating_sub(1)) {
        Some((cut, _)) if text.chars().count() > max => format!("{}…", &text[..cut]),
        _ => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use adapterlab_report_common::fixtures::{self, estimate, is_nan_free};

    use crate::svg::{Bar, delta_chart, domain, means_chart, shorten};

    #[test]
    fn domains_include_zero_and_are_never_empty() {
        assert_eq!(domain([0.2, 0.4].into_iter()), (0.0, 0.4 + 0.4 * 0.05));
        let (lo, hi) = domain([-1.0, 1.0].into_iter());
        assert!((lo + 1.1).abs() < 1e-12 && (hi - 1.1).abs() < 1e-12);
        assert_eq!(domain(std::iter::empty()), (0.0, 1.0));
        assert_eq!(domain([0.0, 0.0].into_iter()), (0.0, 1.0));
        assert_eq!(domain([f64::NAN, f64::INFINITY].into_iter()), (0.0, 1.0));
        assert_eq!(domain([-2.0, -2.0].into_iter()), (-2.0 - 0.1, 0.0));
    }

    #[test]
    fn bars_and_error_bars_sit_on_the_scale() {
        let e = estimate(0.5, 0.25, 0.75);
        let svg = means_chart(
            "c0",
            "rouge1",
            true,
            &[Bar {
                run: 1,
                name: "base",
                estimate: Some(&e),
            }],
        );
        // Domain [0, 0.7875]: the bar rises from y=146 to 146 - 0.5/0.7875*130.
        let top = 146.0 - 0.5 / 0.7875 * 130.0;
        assert!(svg.contains(&format!("y=\"{top:.1}\"")), "{svg}");
        assert!(svg.contains("<title>base: 0.5000 [0.2500, 0.7500]</title>"));
        assert!(svg.contains("role=\"img\""));
        assert!(svg.contains("aria-labelledby=\"c0-title c0-desc\""));
        assert!(svg.contains("<desc id=\"c0-desc\">base: 0.5000 [0.2500, 0.7500]</desc>"));
        assert!(svg.contains("class=\"error\""));
    }

    #[test]
    fn negative_means_hang_below_zero() {
        let e = estimate(-0.5, -0.6, -0.4);
        let svg = means_chart(
            "c0",
            "s",
            true,
            &[Bar {
                run: 1,
                name: "a",
                estimate: Some(&e),
            }],
        );
        assert!(svg.contains(">0.0000</text>"), "no zero label: {svg}");
    }

    #[test]
    fn charts_write_no_non_finite_numbers() {
        let report = fixtures::non_finite();
        let bars: Vec<_> = report
            .runs
            .iter()
            .enumerate()
            .map(|(i, r)| Bar {
                run: i + 1,
                name: &r.name,
                estimate: Some(&r.aggregates[0].estimate),
            })
            .collect();
        let svg = means_chart("c0", "rouge1", true, &bars);
        assert!(is_nan_free(&svg), "{svg}");
        assert!(svg.contains(">n/a</text>"));
        let svg = delta_chart("d", &report.deltas);
        assert!(is_nan_free(&svg), "{svg}");
        // rouge1's mean is NaN: no dot; bleu's is 0.2: one dot.
        assert_eq!(svg.matches("<circle").count(), 1);
    }

    #[test]
    fn missing_estimates_are_marked() {
        let svg = means_chart(
            "c0",
            "s",
            false,
            &[Bar {
                run: 2,
                name: "b",
                estimate: None,
            }],
        );
        assert!(svg.contains(">n/a</text>"));
        assert!(svg.contains("<desc id=\"c0-desc\">b: n/a</desc>"));
        assert!(svg.contains("(lower is better)"));
    }

    #[test]
    fn delta_rows_carry_their_verdict() {
        let svg = delta_chart("d", &fixtures::comparison().deltas);
        assert_eq!(svg.matches("<circle").count(), 3);
        assert!(svg.contains("<g class=\"better\">"));
        assert!(svg.contains("<g class=\"worse\">"));
        assert!(svg.contains("<g class=\"not-significant\">"));
        assert!(svg.contains("+0.0500 [+0.0200, +0.0800] ✓ better</text>"));
        // rouge1's row is scaled to its high end, 0.08: the dot at 0.05 / 0.08 of the half-width.
        let cx = 150.0 + 140.0 + 0.05 / 0.08 * 126.0;
        assert!(svg.contains(&format!("cx=\"{cx:.1}\"")), "{svg}");
    }

    #[test]
    fn user_text_is_escaped_in_charts() {
        let e = estimate(0.1, 0.0, 0.2);
        let svg = means_chart(
            "c0",
            "<b>&",
            true,
            &[Bar {
                run: 1,
                name: "\"x\"<",
                estimate: Some(&e),
            }],
        );
        assert!(svg.contains("Mean &lt;b&gt;&amp; per run"));
        assert!(svg.contains("&quot;x&quot;&lt;: 0.1000"));
    }

    #[test]
    fn labels_are_shortened_on_char_boundaries() {
        assert_eq!(shorten("rouge1", 20), "rouge1");
        assert_eq!(shorten("ééééé", 5), "ééééé");
        assert_eq!(shorten("éééééé", 5), "éééé…");
    }
}
