//! The plots are opened by an independent reader: Python's zlib (with the PNG row filters undone by
//! hand) and its XML parser.

use sim::{Cluster, Scenario};
use std::process::Command;

const CHECK: &str = r#"
import struct, sys, zlib, xml.etree.ElementTree as ET
png, svg = sys.argv[1], sys.argv[2]
data = open(png, "rb").read()
assert data[:8] == b"\x89PNG\r\n\x1a\n", "signature"
pos, idat, size = 8, b"", None
while pos < len(data):
    n, kind = struct.unpack(">I4s", data[pos:pos + 8])
    body = data[pos + 8:pos + 8 + n]
    crc, = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
    assert zlib.crc32(kind + body) == crc, kind
    if kind == b"IHDR":
        size = struct.unpack(">IIBB", body[:10])
    if kind == b"IDAT":
        idat += body
    pos += 12 + n
w, h, depth, colour = size
assert (depth, colour) == (8, 2), size
raw = zlib.decompress(idat)
assert len(raw) == h * (1 + 3 * w), len(raw)
# Undo each row's filter (PNG spec, section 9; 3 bytes a pixel).
def paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)
rows, prior = [], bytes(3 * w)
for r in range(h):
    kind, line = raw[r * (1 + 3 * w)], bytearray(raw[r * (1 + 3 * w) + 1:(r + 1) * (1 + 3 * w)])
    assert kind <= 4, kind
    for i in range(len(line)):
        a = line[i - 3] if i >= 3 else 0
        b, c = prior[i], (prior[i - 3] if i >= 3 else 0)
        line[i] = (line[i] + [0, a, b, (a + b) // 2, paeth(a, b, c)][kind]) & 0xff
    rows.append(bytes(line))
    prior = rows[-1]
def pixels(rows, x0, x1, colour):
    return sum(1 for row in rows for x in range(x0, x1) if row[3 * x:3 * x + 3] == bytes(colour))
blue = pixels(rows, 0, w, [0x1f, 0x77, 0xb4])
# Text is black: the title in the band above the plot, the y label left of the tick numbers.
title_ink = pixels(rows[4:34], 0, w, [0, 0, 0])
y_label_ink = pixels(rows[60:300], 8, 26, [0, 0, 0])
root = ET.parse(svg).getroot()
assert root.tag == "{http://www.w3.org/2000/svg}svg", root.tag
marks = sum(1 for e in root.iter() if e.tag.endswith(("polyline", "rect")))
print(w, h, blue, marks, title_ink, y_label_ink)
"#;

#[test]
fn plots_are_valid_png_and_svg_with_the_data_drawn() {
    if Command::new("python3").arg("-V").output().is_err() {
        println!("SKIPPED plots_are_valid_png_and_svg: python3 is not installed to read them");
        eprintln!("SKIPPED plots_are_valid_png_and_svg: python3 is not installed to read them");
        return;
    }
    let report = Cluster::new(Scenario::built_in("steady").unwrap())
        .unwrap()
        .run()
        .unwrap();
    let dir = std::env::temp_dir().join(format!("sim-plots-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tighter = sim::tune::with_settings(
        &Scenario::built_in("steady").unwrap(),
        &sim::tune::parse_settings("WARM_IP_TARGET=2").unwrap(),
    );
    let tighter = Cluster::new(tighter).unwrap().run().unwrap();
    let runs = vec![
        ("as written".to_string(), &report),
        ("WARM_IP_TARGET=2".to_string(), &tighter),
    ];
    let mut charts = sim::plot::charts(&report);
    charts.push(("compare-held", sim::plot::comparison("steady", &runs)));
    for (name, chart) in charts {
        let (png, svg) = (
            dir.join(format!("{name}.png")),
            dir.join(format!("{name}.svg")),
        );
        std::fs::write(&png, chart.png()).unwrap();
        std::fs::write(&svg, chart.svg()).unwrap();
        let out = Command::new("python3")
            .args(["-c", CHECK])
            .arg(&png)
            .arg(&svg)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let fields: Vec<u64> = String::from_utf8(out.stdout)
            .unwrap()
            .split_whitespace()
            .map(|f| f.parse().unwrap())
            .collect();
        assert_eq!(&fields[..2], &[720, 360], "{name}");
        assert!(
            fields[2] > 100,
            "{name}: the first series is drawn in the PNG: {fields:?}"
        );
        assert!(fields[3] >= 2, "{name}: the SVG has marks");
        assert!(
            fields[4] > 100 && fields[5] > 50,
            "{name}: the PNG has its title and y label written: {fields:?}"
        );
    }
    let svg = std::fs::read_to_string(dir.join("addresses.svg")).unwrap();
    let held_peak = report.timeline.iter().map(|s| s.held).max().unwrap();
    assert!(held_peak > 0);
    assert!(svg.contains("addresses held vs in use"));
    let waits = std::fs::read_to_string(dir.join("add-waits.svg")).unwrap();
    assert!(
        waits.contains(">&lt;100ms</text>") && waits.contains(">&gt;=30s</text>"),
        "the histogram's bars are named by their buckets"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
