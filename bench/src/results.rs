//! Where a run's figures go: the JSON file, whole for a full run, merged for a partial one.
//!
//! A run of some sections (`--only`) replaces those sections and their targets in the file it
//! writes to and keeps every other section as the earlier run left it, so that timing one
//! section again never throws the rest of a full run's figures away. A file of another kind
//! (a quick run's, a debug build's, or one that is not a results file) is not mixed with this
//! run's figures: it is replaced, and the run says so.

use serde_json::{Map, Value, json};

/// The keys of a results file that describe the run rather than hold a section's figures.
const RUN_KEYS: [&str; 5] = ["machine", "quick", "build", "targets", "seconds"];

/// What [`merge`] did with the file that was there.
#[derive(Debug, PartialEq, Eq)]
pub enum Written {
    /// Every section came from this run.
    Whole,
    /// This run's sections replaced theirs; these sections are from the earlier run.
    Merged { kept: Vec<String> },
    /// The earlier file was of another kind and was replaced, for this reason.
    Replaced { why: String },
}

/// The file to write: `run` alone when it ran every section (`partial` false) or there was
/// nothing before it, else `earlier` with `run`'s sections and targets in place of its own
/// (but for a section `run` skipped, `{"skipped": why}`: the earlier figures of it stay).
/// A target belongs to the section named by its `section` key; an earlier target without one
/// is kept unless this run has a target of the same name.
pub fn merge(earlier: Option<&str>, run: Value, partial: bool) -> (Value, Written) {
    let Some(earlier) = earlier.filter(|_| partial) else {
        return (run, Written::Whole);
    };
    let earlier: Map<String, Value> = match serde_json::from_str(earlier) {
        Ok(Value::Object(map)) if map.contains_key("targets") => map,
        _ => {
            let why = "it is not a results file".to_string();
            return (run, Written::Replaced { why });
        }
    };
    for key in ["quick", "build"] {
        if earlier.get(key) != run.get(key) {
            let why = format!(
                "its {key} ({}) is not this run's ({})",
                earlier.get(key).unwrap_or(&Value::Null),
                run.get(key).unwrap_or(&Value::Null)
            );
            return (run, Written::Replaced { why });
        }
    }
    // A section this run skipped (the real path without root) leaves the earlier figures.
    let mut run = run;
    let skipped: Vec<String> = sections(&run)
        .filter(|s| run[*s].get("skipped").is_some() && earlier.contains_key(*s))
        .map(str::to_string)
        .collect();
    if let Value::Object(map) = &mut run {
        for s in &skipped {
            map.remove(s);
        }
    }
    let sections_run: Vec<&str> = sections(&run).collect();
    let mut kept: Vec<String> = sections(&Value::Object(earlier.clone()))
        .filter(|s| !sections_run.contains(s))
        .map(str::to_string)
        .collect();
    kept.sort();
    let run_targets = run["targets"].as_array().cloned().unwrap_or_default();
    let names: Vec<&Value> = run_targets.iter().map(|t| &t["name"]).collect();
    let mut targets: Vec<Value> = earlier["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| match t["section"].as_str() {
            Some(section) => kept.iter().any(|k| k == section),
            None => !names.contains(&&t["name"]),
        })
        .cloned()
        .collect();
    targets.extend(run_targets);
    let mut merged = earlier;
    if let Value::Object(run) = run {
        merged.extend(run);
    }
    merged.insert("targets".into(), json!(targets));
    (Value::Object(merged), Written::Merged { kept })
}

/// The sections a results file holds.
fn sections(results: &Value) -> impl Iterator<Item = &str> {
    results
        .as_object()
        .into_iter()
        .flatten()
        .map(|(key, _)| key.as_str())
        .filter(|key| !RUN_KEYS.contains(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full() -> Value {
        json!({
            "machine": {"cores": 2}, "quick": false, "build": "release", "seconds": 900.0,
            "real_path": {"p99": 1}, "warm": {"p99": 2}, "sts": {"calls": 20},
            "targets": [
                {"section": "real_path", "name": "rp", "value": "1", "goal": "g", "met": false},
                {"section": "warm", "name": "w", "value": "2", "goal": "g", "met": true},
                {"section": "sts", "name": "s", "value": "20", "goal": "g", "met": true},
            ],
        })
    }

    fn real_path_again() -> Value {
        json!({
            "machine": {"cores": 2}, "quick": false, "build": "release", "seconds": 130.0,
            "real_path": {"p99": 9},
            "targets": [
                {"section": "real_path", "name": "rp", "value": "9", "goal": "g", "met": true},
            ],
        })
    }

    /// Each target's name and value, in the file's order.
    fn names_and_values(results: &Value) -> Vec<String> {
        let targets = results["targets"].as_array().into_iter().flatten();
        targets
            .map(|t| format!("{} {}", t["name"], t["value"]).replace('"', ""))
            .collect()
    }

    #[test]
    fn a_partial_run_replaces_its_sections_and_keeps_the_others() {
        let earlier = full().to_string();
        let (merged, written) = merge(Some(&earlier), real_path_again(), true);
        let kept = vec!["sts".to_string(), "warm".to_string()];
        assert_eq!(written, Written::Merged { kept });
        assert_eq!(merged["real_path"], json!({"p99": 9}));
        assert_eq!(merged["warm"], json!({"p99": 2}));
        assert_eq!(merged["sts"], json!({"calls": 20}));
        assert_eq!(merged["seconds"], json!(130.0));
        assert_eq!(names_and_values(&merged), ["w 2", "s 20", "rp 9"]);
    }

    #[test]
    fn a_full_run_or_a_first_run_writes_only_its_own_figures() {
        let earlier = full().to_string();
        let (written, how) = merge(Some(&earlier), real_path_again(), false);
        assert_eq!((written, how), (real_path_again(), Written::Whole));
        let (written, how) = merge(None, real_path_again(), true);
        assert_eq!((written, how), (real_path_again(), Written::Whole));
    }

    #[test]
    fn figures_of_another_kind_are_replaced_not_mixed() {
        let mut quick = full();
        quick["quick"] = json!(true);
        let mut debug = full();
        debug["build"] = json!("debug");
        for (earlier, reason) in [
            (
                quick.to_string(),
                "its quick (true) is not this run's (false)",
            ),
            (
                debug.to_string(),
                "its build (\"debug\") is not this run's (\"release\")",
            ),
            ("not json".to_string(), "it is not a results file"),
            ("{\"a\": 1}".to_string(), "it is not a results file"),
        ] {
            let (written, how) = merge(Some(&earlier), real_path_again(), true);
            assert_eq!(written, real_path_again());
            assert_eq!(
                how,
                Written::Replaced {
                    why: reason.to_string()
                }
            );
        }
    }

    #[test]
    fn a_section_this_run_skipped_keeps_the_earlier_figures() {
        let mut run = real_path_again();
        run["real_path"] = json!({"skipped": "not root"});
        run["targets"] = json!([]);
        let (merged, written) = merge(Some(&full().to_string()), run, true);
        assert_eq!(merged["real_path"], json!({"p99": 1}));
        assert_eq!(merged["targets"], full()["targets"]);
        let kept = vec!["real_path", "sts", "warm"];
        assert_eq!(
            written,
            Written::Merged {
                kept: kept.into_iter().map(String::from).collect()
            }
        );
    }

    #[test]
    fn an_earlier_target_without_a_section_gives_way_to_one_of_its_name() {
        let mut earlier = full();
        for t in earlier["targets"].as_array_mut().into_iter().flatten() {
            t.as_object_mut().map(|t| t.remove("section"));
        }
        let (merged, _) = merge(Some(&earlier.to_string()), real_path_again(), true);
        assert_eq!(names_and_values(&merged), ["w 2", "s 20", "rp 9"]);
    }
}
