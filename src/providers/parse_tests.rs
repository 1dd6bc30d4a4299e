//! What a provider sends, generated: delays in every form (Retry-After in seconds or as an HTTP
//! date, retry-after-ms, Google's RetryInfo) and error and success bodies of every wire format.
//! No input panics, and every delay is bounded.

use std::time::Duration;

use proptest::prelude::*;
use reqwest::header::{HeaderMap, HeaderValue};

use super::{RETRY_AFTER_CAP, retry_after_header};

fn headers(name: &'static str, value: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(name, v);
    }
    h
}

#[test]
fn provider_delays_that_used_to_panic_are_bounded_or_ignored() {
    let cases: [(&'static str, &str, Option<Duration>); 12] = [
        ("retry-after", "inf", None),
        ("retry-after", "NaN", None),
        ("retry-after", "-1", None),
        ("retry-after", "1e30", Some(RETRY_AFTER_CAP)),
        ("retry-after", "7", Some(Duration::from_secs(7))),
        ("retry-after", "1.5", Some(Duration::from_millis(1500))),
        ("retry-after", "soon", None),
        ("retry-after-ms", "1e300", Some(RETRY_AFTER_CAP)),
        ("retry-after-ms", "inf", None),
        ("retry-after-ms", "-5", None),
        ("retry-after-ms", "250", Some(Duration::from_millis(250))),
        // A date in the past means now.
        (
            "retry-after",
            "Wed, 21 Oct 2015 07:28:00 GMT",
            Some(Duration::ZERO),
        ),
    ];
    for (name, value, want) in cases {
        assert_eq!(
            retry_after_header(&headers(name, value)),
            want,
            "{name}: {value}"
        );
    }
    let later = (chrono::Utc::now() + chrono::Duration::seconds(120))
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string();
    let d = retry_after_header(&headers("retry-after", &later)).expect("an HTTP date");
    assert!(
        d > Duration::from_secs(100) && d <= Duration::from_secs(120),
        "{d:?}"
    );
    for delay in ["1e30s", "infs", "-3s", "NaNs", "1e400s"] {
        let body = format!(
            r#"{{"error":{{"code":429,"message":"slow down","details":[{{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"{delay}"}}]}}}}"#
        );
        for d in [
            super::gemini::retry_info(&body),
            super::vision_retry_info(&body),
        ] {
            assert!(d.is_none_or(|d| d <= RETRY_AFTER_CAP), "{delay}: {d:?}");
        }
    }
}

/// Strings a provider might put where a number goes.
fn numberish() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::sample::select(vec![
            "inf",
            "-inf",
            "NaN",
            "1e30",
            "1e300",
            "1e400",
            "-1",
            "0",
            "0.0001",
            "18446744073709551616",
            "9999999999999999999999",
            "",
            " ",
            "1_000",
            "0x10",
            "Wed, 21 Oct 2015 07:28:00 GMT",
            "Thu, 01 Jan 9999 00:00:00 GMT",
        ])
        .prop_map(str::to_owned),
        any::<f64>().prop_map(|f| f.to_string()),
        any::<i64>().prop_map(|i| i.to_string()),
        "[ -~]{0,40}",
    ]
}

/// JSON bodies in the shapes the four wire formats use, with generated values in every slot.
fn body() -> impl Strategy<Value = String> {
    let n = prop_oneof![
        any::<i64>().prop_map(|i| i.to_string()),
        any::<u64>().prop_map(|i| i.to_string()),
        Just("1e12".to_owned()),
        Just("3e9".to_owned()),
        Just("-1".to_owned()),
        Just("1.5".to_owned()),
        Just("null".to_owned()),
        Just("\"7\"".to_owned()),
    ];
    let text = "[ -~]{0,20}".prop_map(|s| serde_json::Value::String(s).to_string());
    (n.clone(), n.clone(), n, text.clone(), numberish(), 0u8..8).prop_map(|(a, b, c, t, d, shape)| {
        match shape {
            0 => format!(r#"{{"choices":[{{"message":{{"role":"assistant","content":{t}}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":{a},"completion_tokens":{b},"prompt_tokens_details":{{"cached_tokens":{c}}}}}}}"#),
            1 => format!(r#"{{"content":[{{"type":"text","text":{t}}}],"stop_reason":"end_turn","usage":{{"input_tokens":{a},"output_tokens":{b},"cache_read_input_tokens":{c}}}}}"#),
            2 => format!(r#"{{"candidates":[{{"content":{{"parts":[{{"text":{t}}}]}}}}],"usageMetadata":{{"promptTokenCount":{a},"candidatesTokenCount":{b},"cachedContentTokenCount":{c},"thoughtsTokenCount":{a}}}}}"#),
            3 => format!(r#"{{"responses":[{{"labelAnnotations":[{{"description":{t},"score":{a}}}]}},{{"error":{{"code":{b},"message":{t}}}}}]}}"#),
            4 => format!(r#"{{"error":{{"code":{a},"message":{t},"status":{t},"details":[{{"retryDelay":"{d}s"}}]}}}}"#),
            5 => format!(r#"{{"type":"error","error":{{"type":{t},"message":{t}}}}}"#),
            6 => format!(r#"{{"usage":{a},"choices":{b}}}"#),
            _ => t,
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn no_delay_a_provider_sends_panics_and_every_one_is_bounded(value in numberish()) {
        for name in ["retry-after", "retry-after-ms"] {
            let d = retry_after_header(&headers(name, &value));
            prop_assert!(d.is_none_or(|d| d <= RETRY_AFTER_CAP), "{name}: {value}: {d:?}");
        }
        let body = format!(r#"{{"error":{{"details":[{{"retryDelay":"{}s"}}]}}}}"#, value.replace('"', ""));
        for d in [super::gemini::retry_info(&body), super::vision_retry_info(&body)] {
            prop_assert!(d.is_none_or(|d| d <= RETRY_AFTER_CAP), "{value}: {d:?}");
        }
    }

    #[test]
    fn no_body_a_provider_sends_panics_any_parser_or_classifier(body in body(), status in 100u16..600) {
        let _ = super::openai::parse_response(status, &body);
        let _ = super::anthropic::parse_response(status, &body);
        let _ = super::gemini::parse_response(status, &body);
        let _ = super::vision::parse_response(status, &body, 2);
        let _ = super::openai::classify(status, &body);
        let _ = super::anthropic::classify(status, &body);
        let _ = super::gemini::classify(status, &body);
        let _ = super::vision::classify(status, &body);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn no_arbitrary_text_panics_any_parser(body in ".{0,200}", status in 100u16..600) {
        let _ = super::openai::parse_response(status, &body);
        let _ = super::anthropic::parse_response(status, &body);
        let _ = super::gemini::parse_response(status, &body);
        let _ = super::vision::parse_response(status, &body, 1);
        let _ = super::gemini::retry_info(&body);
        let _ = super::vision_retry_info(&body);
    }
}

#[test]
fn usage_counts_no_model_can_produce_make_the_answer_unusable() {
    for bad in [
        "1000000000000",
        "-1",
        "3e9",
        "1.5",
        "\"7\"",
        "18446744073709551616",
    ] {
        let bodies = [
            (
                "openai",
                format!(
                    r#"{{"choices":[{{"message":{{"content":"hi"}}}}],"usage":{{"prompt_tokens":{bad},"completion_tokens":3}}}}"#
                ),
            ),
            (
                "anthropic",
                format!(
                    r#"{{"content":[{{"type":"text","text":"hi"}}],"usage":{{"input_tokens":5,"output_tokens":{bad}}}}}"#
                ),
            ),
            (
                "gemini",
                format!(
                    r#"{{"candidates":[{{"content":{{"parts":[{{"text":"hi"}}]}}}}],"usageMetadata":{{"promptTokenCount":5,"thoughtsTokenCount":{bad}}}}}"#
                ),
            ),
        ];
        for (wire, body) in bodies {
            let err = match wire {
                "openai" => super::openai::parse_response(200, &body).map(|_| ()),
                "anthropic" => super::anthropic::parse_response(200, &body).map(|_| ()),
                _ => super::gemini::parse_response(200, &body).map(|_| ()),
            }
            .expect_err(&format!("{wire}: {bad} tokens is not an answer"));
            assert_eq!(err.kind, super::ErrorKind::Malformed, "{wire} {bad}: {err}");
        }
    }
    // The largest honest counts still parse.
    let ok = format!(
        r#"{{"candidates":[{{"content":{{"parts":[{{"text":"hi"}}]}}}}],"usageMetadata":{{"promptTokenCount":{0},"candidatesTokenCount":{0},"thoughtsTokenCount":{0}}}}}"#,
        super::MAX_REPORTED_TOKENS
    );
    assert!(super::gemini::parse_response(200, &ok).is_ok());
}
