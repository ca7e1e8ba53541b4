//! `report.html`: one self-contained page for people, made from the output
//! folder's own files (`outcome.json`, `results.json`, `events.jsonl`,
//! `resources.json` when the board sampled resources): the summary, the
//! results, every event of every source on one timeline with a toggle per
//! source and a search box, kernel warnings marked where they happened,
//! and a memory chart per definition. No network fetches: the styles, the
//! script (a few lines, only for the toggles and the search) and the charts
//! (inline SVG) are all in the file; it reads the same with scripts off.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde_json::Value;

/// The report's file name in the output folder.
pub const FILE: &str = "report.html";

/// Timeline rows kept at most; the rest are counted, not shown (the files
/// beside the report keep everything).
const MAX_ROWS: usize = 50_000;

/// Why the report could not be made.
#[derive(Debug, thiserror::Error)]
pub enum HtmlError {
    /// A file of the output folder could not be read or the report written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The timeline's sources, in toggle order: (name, what it is).
pub const SOURCES: [(&str, &str); 9] = [
    ("dispatcher", "the dispatcher's steps"),
    ("power", "power commands"),
    ("console", "the serial console"),
    ("agent", "the master agent's replies"),
    ("kernel", "the test boot's kernel log (/dev/kmsg)"),
    ("stdout", "test output, stdout"),
    ("stderr", "test output, stderr"),
    ("result", "test results"),
    ("board", "the test agent's other records"),
];

/// Kernel reports that make a line a warning, as the kernel prints them.
const KERNEL_TROUBLE: [&str; 7] = [
    "WARNING:",
    "BUG:",
    "Oops",
    "Kernel panic",
    "blocked for more than",
    "soft lockup",
    "general protection fault",
];

/// Whether a kernel log line reports trouble.
pub fn kernel_trouble(line: &str) -> bool {
    KERNEL_TROUBLE.iter().any(|k| line.contains(k))
}

/// One timeline row.
struct Row {
    ts: String,
    source: &'static str,
    boot: String,
    definition: String,
    text: String,
    trouble: bool,
}

fn read(path: &Path) -> Result<String, HtmlError> {
    std::fs::read_to_string(path).map_err(|source| HtmlError::Io {
        path: path.into(),
        source,
    })
}

/// A JSON file of the folder, or `Null` when it is missing or unreadable
/// (the report is made from whatever a run left).
fn json_file(dir: &Path, name: &str) -> Value {
    read(&dir.join(name))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

/// The rows one event gives (a console chunk gives one per line).
fn rows_of(e: &Value, out: &mut Vec<Row>) {
    let ts = str_of(e, "ts").to_string();
    let boot = str_of(e, "boot").to_string();
    let definition = str_of(e, "definition").to_string();
    let row = |source, text: String, trouble| Row {
        ts: ts.clone(),
        source,
        boot: boot.clone(),
        definition: definition.clone(),
        text,
        trouble,
    };
    let source = str_of(e, "source");
    let kind = str_of(e, "kind");
    match (source, kind) {
        ("console", _) => {
            let text = str_of(e, "text");
            for line in text.split('\n') {
                let line = line.trim_end_matches('\r');
                if !line.is_empty() {
                    out.push(row("console", line.to_string(), false));
                }
            }
        }
        ("test", "kernel") => {
            let line = str_of(e, "line").to_string();
            let trouble = kernel_trouble(&line);
            out.push(row("kernel", line, trouble));
        }
        ("test", "output") => {
            let stream = if str_of(e, "stream") == "stderr" {
                "stderr"
            } else {
                "stdout"
            };
            for line in str_of(e, "text").lines() {
                out.push(row(stream, line.to_string(), false));
            }
        }
        ("test", "result") => {
            let mut text = format!("{} {}", str_of(e, "case"), str_of(e, "result"));
            if let Some(m) = e.get("measurement").filter(|m| !m.is_null()) {
                let _ = write!(text, " {m} {}", str_of(e, "units"));
            }
            out.push(row("result", text, false));
        }
        _ => {
            let source = match source {
                "dispatcher" => "dispatcher",
                "power" => "power",
                "agent" => "agent",
                _ => "board",
            };
            let text = if let Some(m) = e.get("message").and_then(Value::as_str) {
                m.to_string()
            } else {
                // Everything but what every row shows anyway.
                let mut fields = e.clone();
                if let Some(o) = fields.as_object_mut() {
                    for k in ["ts", "source", "boot", "definition"] {
                        o.remove(k);
                    }
                }
                fields.to_string()
            };
            out.push(row(source, text, false));
        }
    }
}

/// `&`, `<`, `>` and quotes escaped for text and attribute values (the
/// same escaping as `junit.xml`'s).
fn esc(s: &str) -> String {
    quick_xml::escape::escape(s).into_owned()
}

/// Seconds from `start` to `ts` (both RFC 3339), for the time column.
fn offset(start: Option<std::time::SystemTime>, ts: &str) -> String {
    match (start, humantime::parse_rfc3339(ts).ok()) {
        (Some(s), Some(t)) => match t.duration_since(s) {
            Ok(d) => format!("{:.3}", d.as_secs_f64()),
            Err(e) => format!("-{:.3}", e.duration().as_secs_f64()),
        },
        _ => String::new(),
    }
}

/// A memory-over-time chart of one definition (`resources.json`'s series).
fn chart(def: &Value) -> String {
    let points: Vec<(f64, f64)> = def
        .get("series")
        .and_then(Value::as_array)
        .map(|s| {
            s.iter()
                .filter_map(|p| {
                    Some((
                        p.get("ts_us")?.as_f64()?,
                        p.get("used_kib")?.as_f64()? / 1024.0,
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    let name = esc(str_of(def, "definition"));
    if points.len() < 2 {
        return format!("<p>{name}: too few samples for a chart.</p>");
    }
    let (w, h) = (600.0, 160.0);
    let t0 = points.first().map_or(0.0, |p| p.0);
    let t1 = points.last().map_or(1.0, |p| p.0).max(t0 + 1.0);
    let top = points.iter().map(|p| p.1).fold(1.0, f64::max) * 1.1;
    let mut line = String::new();
    for (t, mib) in &points {
        let x = (t - t0) / (t1 - t0) * w;
        let y = h - mib / top * h;
        let _ = write!(line, "{x:.1},{y:.1} ");
    }
    format!(
        r#"<figure class="chart"><figcaption>{name}: system memory in use, MiB (peak {peak:.1}) over {secs:.1} s</figcaption><svg viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img"><rect width="{w}" height="{h}" class="bg"/><polyline points="{line}" class="mem"/><text x="4" y="12">{top:.0} MiB</text><text x="4" y="{h2}">0</text></svg></figure>"#,
        peak = points.iter().map(|p| p.1).fold(0.0, f64::max),
        secs = (t1 - t0) / 1e6,
        h2 = h - 4.0,
    )
}

const STYLE: &str = r#"
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em}h2{font-size:1.1em;margin-top:1.5em}
table{border-collapse:collapse}td,th{padding:2px 8px;text-align:left;vertical-align:top}
#results td{border-bottom:1px solid #ddd}
tr.pass td.r{color:#176f2c}tr.fail td.r{color:#b3261e;font-weight:bold}tr.skip td.r,tr.unknown td.r{color:#8a6d00}
.class-complete{color:#176f2c}.class-other{color:#b3261e}
#controls label{margin-right:1em;white-space:nowrap}
#timeline{font:12px/1.3 ui-monospace,monospace}#timeline td{padding:0 6px;white-space:pre-wrap}
#timeline td.t{color:#777;text-align:right}#timeline td.s{color:#555}
tr.kwarn td{background:#fde7e4;color:#8c1d18;font-weight:bold}
tr[data-src=kernel] td.s{color:#6a3fa0}tr[data-src=stderr] td.x{color:#a14a00}tr[data-src=result] td.x{color:#0b57d0}
.chart svg .bg{fill:#fafafa;stroke:#ccc}.chart svg .mem{fill:none;stroke:#0b57d0;stroke-width:1.5}.chart text{font-size:10px;fill:#555}
"#;

/// Hides rows whose source is off or that do not match the search.
const SCRIPT: &str = r#"
(function(){
  var rows=document.querySelectorAll('#timeline tbody tr');
  var boxes=document.querySelectorAll('#controls input[type=checkbox]');
  var search=document.getElementById('search');
  function apply(){
    var on={};boxes.forEach(function(b){on[b.value]=b.checked;});
    var q=search.value.toLowerCase();
    rows.forEach(function(r){
      var show=on[r.dataset.src]&&(!q||r.textContent.toLowerCase().indexOf(q)>=0);
      r.style.display=show?'':'none';
    });
  }
  boxes.forEach(function(b){b.addEventListener('change',apply);});
  search.addEventListener('input',apply);
  apply();
})();
"#;

/// Makes the report's HTML from the output folder's files, with `outcome`
/// instead of `outcome.json` when given (the run writes that file last).
///
/// # Errors
/// When `events.jsonl` exists but cannot be read.
pub fn render(dir: &Path, outcome: Option<&Value>) -> Result<String, HtmlError> {
    let outcome = outcome
        .cloned()
        .unwrap_or_else(|| json_file(dir, "outcome.json"));
    let results = json_file(dir, "results.json");
    let resources = json_file(dir, "resources.json");
    let mut rows = Vec::new();
    let mut dropped = 0usize;
    let events_path = dir.join("events.jsonl");
    if let Ok(file) = std::fs::File::open(&events_path) {
        for line in BufReader::new(file).lines() {
            let line = line.map_err(|source| HtmlError::Io {
                path: events_path.clone(),
                source,
            })?;
            let Ok(e) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if rows.len() < MAX_ROWS {
                rows_of(&e, &mut rows);
            } else {
                dropped += 1;
            }
        }
    }
    // One time order across sources and boots (stable: a chunk's lines stay in order).
    rows.sort_by(|a, b| a.ts.cmp(&b.ts));
    let start = rows
        .first()
        .and_then(|r| humantime::parse_rfc3339(&r.ts).ok());

    let job = str_of(&outcome, "job");
    let class = str_of(&outcome, "class");
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Ferry: {title}</title><style>{STYLE}</style></head><body>\n",
        title = esc(if job.is_empty() { "job" } else { job })
    );
    let _ = write!(
        h,
        "<h1>Job {job} on {device}: <span id=\"class\" class=\"{cls}\">{class}</span></h1>\n<p id=\"message\">{message}</p>\n",
        job = esc(job),
        device = esc(str_of(&outcome, "device")),
        cls = if class == "complete" { "class-complete" } else { "class-other" },
        class = esc(if class.is_empty() { "no outcome" } else { class }),
        message = esc(str_of(&outcome, "message")),
    );
    if let Some(d) = outcome.get("duration_seconds").and_then(Value::as_f64) {
        let _ = writeln!(h, "<p>Took {d:.1} s.</p>");
    }
    if let Some(w) = outcome.get("warnings").and_then(Value::as_array) {
        for w in w.iter().filter_map(Value::as_str) {
            let _ = writeln!(h, "<p class=\"class-other\">Warning: {}</p>", esc(w));
        }
    }

    h.push_str("<h2>Results</h2>\n<table id=\"results\"><thead><tr><th>definition</th><th>case</th><th>result</th><th>measurement</th><th>set</th><th>note</th></tr></thead><tbody>\n");
    for r in results.as_array().into_iter().flatten() {
        let result = str_of(r, "result");
        let measurement = match r.get("measurement") {
            Some(m) if !m.is_null() => format!("{m} {}", str_of(r, "units")),
            _ => String::new(),
        };
        let note = [str_of(r, "message"), str_of(r, "reference")].join(" ");
        let _ = writeln!(
            h,
            "<tr class=\"{cls}\"><td>{suite}</td><td>{name}</td><td class=\"r\">{result}</td><td>{m}</td><td>{set}</td><td>{note}</td></tr>",
            cls = esc(result),
            suite = esc(str_of(r, "suite")),
            name = esc(str_of(r, "name")),
            result = esc(result),
            m = esc(&measurement),
            set = esc(str_of(r, "set")),
            note = esc(note.trim()),
        );
    }
    h.push_str("</tbody></table>\n");

    let trouble: Vec<(usize, &Row)> = rows.iter().enumerate().filter(|(_, r)| r.trouble).collect();
    if !trouble.is_empty() {
        let _ = writeln!(h, "<h2>Kernel warnings</h2>\n<ul id=\"kernel-warnings\">");
        for (i, r) in &trouble {
            let _ = writeln!(
                h,
                "<li><a href=\"#ev{i}\">{t} s</a>: {text}</li>",
                t = offset(start, &r.ts),
                text = esc(&r.text)
            );
        }
        h.push_str("</ul>\n");
    }

    if let Some(defs) = resources.get("definitions").and_then(Value::as_array) {
        h.push_str("<h2>Memory</h2>\n");
        for d in defs {
            h.push_str(&chart(d));
        }
    }

    h.push_str("<h2>Timeline</h2>\n<div id=\"controls\">");
    for (name, what) in SOURCES {
        let n = rows.iter().filter(|r| r.source == name).count();
        let _ = write!(
            h,
            "<label title=\"{what}\"><input type=\"checkbox\" id=\"src-{name}\" value=\"{name}\" checked> {name} ({n})</label>"
        );
    }
    h.push_str(" <input type=\"search\" id=\"search\" placeholder=\"search\"></div>\n");
    if dropped > 0 {
        let _ = writeln!(
            h,
            "<p>{dropped} more events are in events.jsonl, not shown here.</p>"
        );
    }
    h.push_str("<table id=\"timeline\"><thead><tr><th>s</th><th>source</th><th>boot</th><th>definition</th><th>text</th></tr></thead><tbody>\n");
    for (i, r) in rows.iter().enumerate() {
        let _ = writeln!(
            h,
            "<tr id=\"ev{i}\" data-src=\"{src}\"{cls} title=\"{ts}\"><td class=\"t\">{t}</td><td class=\"s\">{src}</td><td>{boot}</td><td>{def}</td><td class=\"x\">{text}</td></tr>",
            src = r.source,
            cls = if r.trouble { " class=\"kwarn\"" } else { "" },
            ts = esc(&r.ts),
            t = offset(start, &r.ts),
            boot = esc(r.boot.get(..8).unwrap_or(&r.boot)),
            def = esc(&r.definition),
            text = esc(&r.text),
        );
    }
    let _ = write!(
        h,
        "</tbody></table>\n<script>{SCRIPT}</script>\n</body></html>\n"
    );
    Ok(h)
}

/// Writes `report.html` in `dir` from the files there (and `outcome`, see
/// [`render`]), atomically.
///
/// # Errors
/// When the folder's events cannot be read or the report written.
pub fn write(dir: &Path, outcome: Option<&Value>) -> Result<(), HtmlError> {
    let html = render(dir, outcome)?;
    crate::output::put(dir, FILE, html.as_bytes()).map_err(|source| HtmlError::Io {
        path: dir.join(FILE),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_holds_every_source_escaped_and_marks_kernel_trouble() {
        let dir = tempfile::tempdir().expect("tmp");
        let events = [
            r#"{"ts":"2026-01-01T00:00:00.000000Z","source":"dispatcher","phase":"power-on"}"#,
            r#"{"ts":"2026-01-01T00:00:01.000000Z","source":"console","text":"line one\r\n<script>x</script>\r\n"}"#,
            r#"{"ts":"2026-01-01T00:00:03.000000Z","source":"test","kind":"kernel","boot":"b1","line":"WARNING: CPU: 0 PID: 1 at x.c:1"}"#,
            r#"{"ts":"2026-01-01T00:00:02.000000Z","source":"test","kind":"output","boot":"b1","definition":"d","stream":"stderr","text":"oops on stderr\n"}"#,
            r#"{"ts":"2026-01-01T00:00:04.000000Z","source":"test","kind":"result","boot":"b1","definition":"d","case":"c","result":"pass"}"#,
        ];
        std::fs::write(dir.path().join("events.jsonl"), events.join("\n")).expect("events");
        std::fs::write(
            dir.path().join("results.json"),
            r#"[{"suite":"d","name":"c","result":"pass"},{"suite":"kernel","name":"warning","result":"fail","message":"WARNING: CPU: 0"}]"#,
        )
        .expect("results");
        let html = render(dir.path(), None).expect("render");
        assert!(html.contains("&lt;script&gt;x&lt;/script&gt;"), "escaped");
        assert!(!html.contains("<script>x"), "never raw");
        for src in ["dispatcher", "console", "kernel", "stderr", "result"] {
            assert!(html.contains(&format!("data-src=\"{src}\"")), "{src}");
        }
        // One time order: the stderr line (2 s) comes before the kernel warning (3 s).
        let stderr = html.find("oops on stderr").expect("stderr row");
        let warning = html.find("class=\"kwarn\"").expect("marked warning");
        assert!(stderr < warning);
        assert!(html.contains("id=\"kernel-warnings\""));
        assert!(
            !html.contains("http://") && !html.contains("https://"),
            "no fetches"
        );
    }
}
