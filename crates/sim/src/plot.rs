//! The simulator's plots, as SVG and PNG (the same geometry; the PNG's text in capitals of a 5x7 pixel
//! font): addresses held vs in use, EC2 mutating calls per second against the account's refill rate,
//! and the distribution of ADD waits, with axes in round steps. The drawing is our own (a few lines
//! of SVG, a small rasteriser); the PNG is encoded by the `png` crate. See docs/architecture.md for
//! why not plotters.

use crate::Report;
use std::fmt::Write;

const WIDTH: usize = 720;
const HEIGHT: usize = 360;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;

type Rgb = [u8; 3];
const BLUE: Rgb = [0x1f, 0x77, 0xb4];
const ORANGE: Rgb = [0xff, 0x7f, 0x0e];
const RED: Rgb = [0xd6, 0x27, 0x28];
const PALETTE: [Rgb; 6] = [
    BLUE,
    ORANGE,
    [0x2c, 0xa0, 0x2c],
    RED,
    [0x94, 0x67, 0xbd],
    [0x8c, 0x56, 0x4b],
];

enum Mark {
    Line(Vec<(f64, f64)>),
    /// Bars from y = 0, one per (x start, x end, height).
    Bars(Vec<(f64, f64, f64)>),
    /// A horizontal line across the plot.
    Level(f64),
}

struct Series {
    name: String,
    colour: Rgb,
    mark: Mark,
}

pub struct Chart {
    title: String,
    x_label: String,
    y_label: String,
    /// Named ticks on the x axis (a histogram's buckets); none: five numbers across the range.
    x_ticks: Vec<(f64, String)>,
    series: Vec<Series>,
}

impl Chart {
    fn x_ticks(&self, f: &Frame) -> Vec<(f64, String)> {
        if !self.x_ticks.is_empty() {
            return self.x_ticks.clone();
        }
        let step = round_step((f.x1 - f.x0) / 4.0);
        let first = (f.x0 / step).ceil() as i64;
        let last = (f.x1 / step + 1e-9).floor() as i64;
        (first..=last)
            .map(|i| {
                let x = i as f64 * step;
                (x, tick(x))
            })
            .collect()
    }
}

/// A chart's file name (without extension) and the chart.
pub fn charts(report: &Report) -> Vec<(&'static str, Chart)> {
    vec![
        ("addresses", addresses(report)),
        ("ec2-calls", ec2_calls(report)),
        ("add-waits", add_waits(report)),
    ]
}

/// `simulate --compare`: the addresses each run held, one line a run, named by `labels`.
pub fn comparison(scenario: &str, runs: &[(String, &Report)]) -> Chart {
    Chart {
        title: format!("{scenario}: addresses held, by settings"),
        x_label: "simulated seconds".into(),
        y_label: "addresses held (all nodes)".into(),
        x_ticks: Vec::new(),
        series: runs
            .iter()
            .enumerate()
            .map(|(i, (label, r))| Series {
                name: format!("{}: {label}", i + 1),
                colour: PALETTE[i % PALETTE.len()],
                mark: Mark::Line(
                    r.timeline
                        .iter()
                        .map(|s| (s.t_secs, s.held as f64))
                        .collect(),
                ),
            })
            .collect(),
    }
}

fn addresses(r: &Report) -> Chart {
    let line = |f: fn(&crate::report::Sample) -> u64| {
        Mark::Line(r.timeline.iter().map(|s| (s.t_secs, f(s) as f64)).collect())
    };
    Chart {
        title: format!("{}: addresses held vs in use", r.scenario),
        x_label: "simulated seconds".into(),
        y_label: "addresses (all nodes)".into(),
        x_ticks: Vec::new(),
        series: vec![
            Series {
                name: "held".into(),
                colour: BLUE,
                mark: line(|s| s.held),
            },
            Series {
                name: "in use".into(),
                colour: ORANGE,
                mark: line(|s| s.in_use),
            },
        ],
    }
}

fn ec2_calls(r: &Report) -> Chart {
    let rate = r
        .timeline
        .windows(2)
        .map(|w| {
            let dt = (w[1].t_secs - w[0].t_secs).max(f64::MIN_POSITIVE);
            (
                w[1].t_secs,
                (w[1].mutating_calls - w[0].mutating_calls) as f64 / dt,
            )
        })
        .collect();
    Chart {
        title: format!("{}: EC2 mutating calls per second", r.scenario),
        x_label: "simulated seconds".into(),
        y_label: "calls per second".into(),
        x_ticks: Vec::new(),
        series: vec![
            Series {
                name: "calls".into(),
                colour: BLUE,
                mark: Mark::Line(rate),
            },
            Series {
                name: "account refill".into(),
                colour: RED,
                mark: Mark::Level(r.mutating_refill_per_sec),
            },
        ],
    }
}

fn add_waits(r: &Report) -> Chart {
    let bars = r
        .add_wait
        .histogram
        .iter()
        .enumerate()
        .map(|(i, b)| (i as f64, i as f64 + 0.9, b.adds as f64))
        .collect();
    let buckets = r
        .add_wait
        .histogram
        .iter()
        .enumerate()
        .map(|(i, b)| (i as f64 + 0.45, b.label.clone()))
        .collect();
    Chart {
        title: format!("{}: ADD waits for an address", r.scenario),
        x_label: "wait for an address (0: one was free)".into(),
        y_label: "ADDs".into(),
        x_ticks: buckets,
        series: vec![Series {
            name: "ADDs".into(),
            colour: BLUE,
            mark: Mark::Bars(bars),
        }],
    }
}

/// The data's extent, with y from zero.
struct Frame {
    x0: f64,
    x1: f64,
    y1: f64,
    y_step: f64,
}

/// The round step (1, 2 or 5 times a power of ten) nearest above `rough`.
fn round_step(rough: f64) -> f64 {
    let scale = 10f64.powf(rough.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * scale)
        .find(|step| *step >= rough * 0.999_999)
        .unwrap_or(10.0 * scale)
}

impl Frame {
    fn of(chart: &Chart) -> Frame {
        let (mut x0, mut x1, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, 0.0f64);
        for s in &chart.series {
            match &s.mark {
                Mark::Line(points) => {
                    for &(x, y) in points {
                        (x0, x1, y1) = (x0.min(x), x1.max(x), y1.max(y));
                    }
                }
                Mark::Bars(bars) => {
                    for &(a, b, h) in bars {
                        (x0, x1, y1) = (x0.min(a), x1.max(b), y1.max(h));
                    }
                }
                Mark::Level(y) => y1 = y1.max(*y),
            }
        }
        if !x0.is_finite() || x1 <= x0 {
            (x0, x1) = (0.0, 1.0);
        }
        let y_step = round_step(if y1 > 0.0 { y1 } else { 1.0 } / 4.0);
        Frame {
            x0,
            x1,
            // The top tick at or above the highest value.
            y1: (y1 / y_step).ceil().max(1.0) * y_step,
            y_step,
        }
    }

    /// 0 to the top in round steps.
    fn y_ticks(&self) -> Vec<f64> {
        let n = (self.y1 / self.y_step).round() as u32;
        (0..=n).map(|i| f64::from(i) * self.y_step).collect()
    }

    fn px(&self, x: f64) -> f64 {
        LEFT + (x - self.x0) / (self.x1 - self.x0) * (WIDTH as f64 - LEFT - RIGHT)
    }

    fn py(&self, y: f64) -> f64 {
        HEIGHT as f64 - BOTTOM - y / self.y1 * (HEIGHT as f64 - TOP - BOTTOM)
    }
}

fn hex(c: Rgb) -> String {
    format!("#{:02x}{:02x}{:02x}", c[0], c[1], c[2])
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

impl Chart {
    pub fn svg(&self) -> String {
        let f = Frame::of(self);
        let mut o = String::new();
        let _ = writeln!(
            o,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(o, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(
            o,
            r#"<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>"#,
            WIDTH / 2,
            escape(&self.title)
        );
        let (bottom, left) = (f.py(0.0), f.px(f.x0));
        let _ = writeln!(
            o,
            r#"<path d="M{left:.1} {TOP:.1} V{bottom:.1} H{:.1}" stroke="black" fill="none"/>"#,
            WIDTH as f64 - RIGHT
        );
        for y in f.y_ticks() {
            let _ = writeln!(
                o,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                left - 6.0,
                f.py(y) + 4.0,
                tick(y)
            );
        }
        for (x, label) in self.x_ticks(&f) {
            let _ = writeln!(
                o,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                f.px(x),
                bottom + 16.0,
                escape(&label)
            );
        }
        let _ = writeln!(
            o,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            WIDTH / 2,
            HEIGHT - 10,
            escape(&self.x_label)
        );
        let _ = writeln!(
            o,
            r#"<text transform="translate(16 {}) rotate(-90)" text-anchor="middle">{}</text>"#,
            HEIGHT / 2,
            escape(&self.y_label)
        );
        for (i, s) in self.series.iter().enumerate() {
            let colour = hex(s.colour);
            match &s.mark {
                Mark::Line(points) if !points.is_empty() => {
                    let d: Vec<String> = points
                        .iter()
                        .map(|&(x, y)| format!("{:.1},{:.1}", f.px(x), f.py(y)))
                        .collect();
                    let _ = writeln!(
                        o,
                        r#"<polyline points="{}" stroke="{colour}" stroke-width="1.5" fill="none"/>"#,
                        d.join(" ")
                    );
                }
                Mark::Line(_) => {}
                Mark::Bars(bars) => {
                    for &(a, b, h) in bars {
                        let _ = writeln!(
                            o,
                            r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{colour}"/>"#,
                            f.px(a),
                            f.py(h),
                            f.px(b) - f.px(a),
                            bottom - f.py(h)
                        );
                    }
                }
                Mark::Level(y) => {
                    let _ = writeln!(
                        o,
                        r#"<line x1="{left:.1}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="{colour}" stroke-dasharray="6 4"/>"#,
                        WIDTH as f64 - RIGHT,
                        f.py(*y),
                        f.py(*y)
                    );
                }
            }
            let (x, ly) = legend_square(i);
            let _ = writeln!(
                o,
                r#"<rect x="{x:.1}" y="{ly:.1}" width="10" height="10" fill="{colour}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
                x + 15.0,
                ly + 9.0,
                escape(&s.name)
            );
        }
        o.push_str("</svg>\n");
        o
    }

    pub fn png(&self) -> Vec<u8> {
        let f = Frame::of(self);
        let mut c = Canvas::new();
        let (bottom, left, right) = (f.py(0.0), f.px(f.x0), WIDTH as f64 - RIGHT);
        c.line((left, TOP), (left, bottom), [0; 3]);
        c.line((left, bottom), (right, bottom), [0; 3]);
        for y in f.y_ticks().into_iter().skip(1) {
            let y = f.py(y);
            c.line((left, y), (right, y), [0xe0; 3]);
        }
        // Text where the SVG has it: (x, y) is the middle of the text's left, centre or right end.
        c.text(&self.title, (WIDTH as f64 / 2.0, 18.0), Anchor::Middle, 2);
        for y in f.y_ticks() {
            c.text(&tick(y), (left - 6.0, f.py(y)), Anchor::End, 1);
        }
        for (x, label) in self.x_ticks(&f) {
            c.text(&label, (f.px(x), bottom + 12.0), Anchor::Middle, 1);
        }
        c.text(
            &self.x_label,
            (WIDTH as f64 / 2.0, HEIGHT as f64 - 14.0),
            Anchor::Middle,
            1,
        );
        c.text_upwards(&self.y_label, (16.0, HEIGHT as f64 / 2.0));
        for (i, s) in self.series.iter().enumerate() {
            let (x, ly) = legend_square(i);
            c.fill((x, ly), (x + 10.0, ly + 10.0), s.colour);
            c.text(&s.name, (x + 15.0, ly + 5.0), Anchor::Start, 1);
        }
        for s in &self.series {
            match &s.mark {
                Mark::Line(points) => {
                    for w in points.windows(2) {
                        let a = (f.px(w[0].0), f.py(w[0].1));
                        let b = (f.px(w[1].0), f.py(w[1].1));
                        c.line(a, b, s.colour);
                    }
                }
                Mark::Bars(bars) => {
                    for &(a, b, h) in bars {
                        c.fill((f.px(a), f.py(h)), (f.px(b), bottom), s.colour);
                    }
                }
                Mark::Level(y) => {
                    let y = f.py(*y);
                    let mut x = left;
                    while x < right {
                        c.line((x, y), ((x + 6.0).min(right), y), s.colour);
                        x += 10.0;
                    }
                }
            }
        }
        c.encode()
    }
}

/// The top left corner of series `i`'s square in the legend; its name follows 15 pixels right.
fn legend_square(i: usize) -> (f64, f64) {
    (WIDTH as f64 - RIGHT - 130.0, TOP + 14.0 * i as f64)
}

fn tick(v: f64) -> String {
    if v.abs() >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v.fract() == 0.0 || v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

#[derive(Clone, Copy)]
enum Anchor {
    Start,
    Middle,
    End,
}

/// Rows of a 5x7 glyph, top first, the leftmost pixel in bit 4.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_uppercase() {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        ' ' => [0; 7],
        '.' => [0, 0, 0, 0, 0, 0x0C, 0x0C],
        ',' => [0, 0, 0, 0, 0x0C, 0x04, 0x08],
        ':' => [0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0],
        '/' => [0, 0x01, 0x02, 0x04, 0x08, 0x10, 0],
        '<' => [0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02],
        '>' => [0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08],
        '=' => [0, 0, 0x1F, 0, 0x1F, 0, 0],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '-' => [0, 0, 0, 0x1F, 0, 0, 0],
        '+' => [0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        '_' => [0, 0, 0, 0, 0, 0, 0x1F],
        '\'' => [0x0C, 0x04, 0x08, 0, 0, 0, 0],
        '#' => [0x0A, 0x0A, 0x1F, 0x0A, 0x1F, 0x0A, 0x0A],
        '*' => [0, 0x04, 0x15, 0x0E, 0x15, 0x04, 0],
        // Anything else (the glyph of '?').
        _ => [0x0E, 0x11, 0x01, 0x02, 0x04, 0, 0x04],
    }
}

/// A glyph cell: 5 pixels and a space, 7 rows.
const CELL: (i64, i64) = (6, 7);

/// An RGB raster.
struct Canvas {
    pixels: Vec<u8>,
}

impl Canvas {
    fn new() -> Canvas {
        Canvas {
            pixels: vec![0xff; WIDTH * HEIGHT * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if (0..WIDTH as i64).contains(&x) && (0..HEIGHT as i64).contains(&y) {
            let i = (y as usize * WIDTH + x as usize) * 3;
            self.pixels[i..i + 3].copy_from_slice(&c);
        }
    }

    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: Rgb) {
        let steps = (x1 - x0).abs().max((y1 - y0).abs()).ceil().max(1.0) as i64;
        for i in 0..=steps {
            let t = i as f64 / steps as f64;
            self.set(
                (x0 + (x1 - x0) * t).round() as i64,
                (y0 + (y1 - y0) * t).round() as i64,
                c,
            );
        }
    }

    /// Black text, `scale` pixels a font pixel, its vertical middle at `y`.
    fn text(&mut self, text: &str, (x, y): (f64, f64), anchor: Anchor, scale: i64) {
        let width = text.chars().count() as i64 * CELL.0 * scale - scale;
        let x0 = x.round() as i64
            - match anchor {
                Anchor::Start => 0,
                Anchor::Middle => width / 2,
                Anchor::End => width,
            };
        let y0 = y.round() as i64 - CELL.1 * scale / 2;
        for (i, ch) in text.chars().enumerate() {
            let left = x0 + i as i64 * CELL.0 * scale;
            self.glyph(ch, scale, |col, row| (left + col, y0 + row));
        }
    }

    /// Text read from bottom to top (a y-axis label), centred on `(x, y)`.
    fn text_upwards(&mut self, text: &str, (x, y): (f64, f64)) {
        let length = text.chars().count() as i64 * CELL.0 - 1;
        let (x0, bottom) = (x.round() as i64 - CELL.1 / 2, y.round() as i64 + length / 2);
        for (i, ch) in text.chars().enumerate() {
            let start = bottom - i as i64 * CELL.0;
            self.glyph(ch, 1, |col, row| (x0 + row, start - col));
        }
    }

    /// Sets a glyph's pixels, each at the position `at(column, row)` gives (scaled).
    fn glyph(&mut self, ch: char, scale: i64, at: impl Fn(i64, i64) -> (i64, i64)) {
        for (row, bits) in glyph(ch).into_iter().enumerate() {
            for col in 0..5 {
                if bits & (0x10 >> col) != 0 {
                    for dy in 0..scale {
                        for dx in 0..scale {
                            let (x, y) = at(col * scale + dx, row as i64 * scale + dy);
                            self.set(x, y, [0; 3]);
                        }
                    }
                }
            }
        }
    }

    fn fill(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: Rgb) {
        for y in y0.round() as i64..y1.round() as i64 {
            for x in x0.round() as i64..x1.round() as i64 {
                self.set(x, y, c);
            }
        }
    }

    /// PNG, 8-bit RGB, one zlib stream of stored deflate blocks.
    /// The `png` crate's encoder: compressed, with its checksums, where a stored-block encoder of our
    /// own wrote four times the bytes.
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, WIDTH as u32, HEIGHT as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder
            .write_header()
            .and_then(|mut w| w.write_image_data(&self.pixels))
            .expect("an in-memory PNG of a fixed size encodes");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(y_max: f64, x_max: f64) -> Chart {
        Chart {
            title: "t".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            x_ticks: Vec::new(),
            series: vec![Series {
                name: "s".into(),
                colour: BLUE,
                mark: Mark::Line(vec![(0.0, 0.0), (x_max, y_max)]),
            }],
        }
    }

    /// 1, 2 or 5 times a power of ten.
    fn round(step: f64) -> bool {
        let scale = 10f64.powf(step.log10().floor());
        [1.0, 2.0, 5.0, 10.0]
            .iter()
            .any(|m| (step / scale - m).abs() < 1e-9)
    }

    #[test]
    fn ticks_land_on_round_numbers_and_cover_the_data() {
        for (y_max, x_max) in [
            (63.3, 86_400.0),
            (1.0, 60.0),
            (977.0, 7.5),
            (0.37, 1.0),
            (12_345.0, 3.0),
        ] {
            let c = chart(y_max, x_max);
            let f = Frame::of(&c);
            let ys = f.y_ticks();
            assert!(ys.len() >= 3 && ys.len() <= 7, "{y_max}: {ys:?}");
            let step = ys[1] - ys[0];
            assert!(round(step), "{y_max}: step {step}");
            assert!(ys.windows(2).all(|w| ((w[1] - w[0]) - step).abs() < 1e-9));
            assert_eq!(ys[0], 0.0);
            assert!(
                *ys.last().unwrap() >= y_max && f.y1 >= y_max,
                "{y_max}: {ys:?}"
            );
            let xs: Vec<f64> = c.x_ticks(&f).into_iter().map(|(x, _)| x).collect();
            let step = xs[1] - xs[0];
            assert!(round(step), "{x_max}: x step {step} in {xs:?}");
            assert!(xs
                .iter()
                .all(|x| (x / step).fract().abs() < 1e-9 && *x <= x_max));
        }
    }

    #[test]
    fn the_png_decodes_to_the_chart() {
        let bytes = chart(63.3, 100.0).png();
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().expect("a PNG");
        let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut pixels).unwrap();
        assert_eq!((info.width, info.height), (WIDTH as u32, HEIGHT as u32));
        assert_eq!(&pixels[..3], &[0xff; 3], "a white corner");
        let blue = pixels.chunks(3).filter(|p| *p == BLUE).count();
        assert!(blue > 100, "the series is drawn: {blue} blue pixels");
    }
}
