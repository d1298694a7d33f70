//! Property tests ("fuzz") of how `POST /receive` reads a body into a job or a workflow: whatever
//! arrives, parsing never panics, and answers either jobs whose tasks are accepted or an error with a 4xx
//! status and a JSON `{"error": reason}`. Bounded: `PROPTEST_CASES` cases per property (proptest's
//! default, 256, keeps `cargo test -p web` fast); many more with
//! `PROPTEST_CASES=20000 cargo test -p web --release --test request_fuzz`.
//!
//! No database or broker: [`parse_submission`] is pure, and the through-Rocket properties mount a route
//! that uses the real body guard, error type and catcher, but stores and publishes nothing.

use proptest::prelude::*;
use proptest::test_runner::TestRunner;
use rocket::http::{ContentType, Status};
use rocket::local::blocking::Client;
use rocket::serde::json::Json;
use runtime::CeleryConfig;
use serde_json::{json, Map, Value};
use web::error::Error;
use web::idempotency::{parse_key, MAX_KEY_CHARS};
use web::routes::receive::Received;
use web::submission::{parse_submission, Accepts, JobRequest, Submission, MAX_DELAY_SECONDS};
use web::workflow::Kind;

/// Task names accepted besides the default task; one is not ASCII.
const EXTRA_TASKS: [&str; 3] = ["tasks.add", "py.mul", "proj.tâches.ünïcode"];
/// Small, so that bodies over it are generated often.
const BODY_LIMIT: u64 = 2048;

fn config() -> CeleryConfig {
    CeleryConfig {
        web_allowed_tasks: EXTRA_TASKS.iter().map(|t| t.to_string()).collect(),
        web_body_limit: BODY_LIMIT,
        ..CeleryConfig::default()
    }
}

fn accepts() -> Accepts {
    Accepts::new(&config())
}

fn accepted_names() -> Vec<String> {
    accepts().tasks.into_iter().collect()
}

// ---------------------------------------------------------------------------------------------
// Strategies

/// Any string: arbitrary Unicode (control characters, astral planes, NUL) or none at all.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "\\PC{0,16}",
        Just(String::new()),
        Just("\u{0}".to_string()),
        Just("\u{1F600}\u{202E}\u{FEFF}".to_string()),
    ]
}

/// Any JSON number, including the extremes and the fractional.
fn number() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        (-2.0f64..2.0).prop_map(Value::from),
        prop::sample::select(vec![
            0.0,
            -0.0,
            f64::MIN_POSITIVE,
            f64::MAX,
            f64::MIN,
            MAX_DELAY_SECONDS,
            MAX_DELAY_SECONDS + 1e-6,
            1e300,
        ])
        .prop_map(Value::from),
    ]
}

/// Arbitrary JSON, every type, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        number(),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(text(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// `value` inside `depth` arrays or objects: far past serde_json's recursion limit at times.
fn nested(value: Value, depth: usize, in_objects: bool) -> String {
    let inner = value.to_string();
    if in_objects {
        format!("{}{inner}{}", "{\"a\":".repeat(depth), "}".repeat(depth))
    } else {
        format!("{}{inner}{}", "[".repeat(depth), "]".repeat(depth))
    }
}

/// Task names: accepted ones, near misses of them, and anything at all.
fn task_name() -> impl Strategy<Value = Value> {
    let accepted = prop::sample::select(accepted_names());
    let extra = prop::sample::select(vec!["X", " ", "\u{0}", ".", "é", "\u{200B}"]);
    prop_oneof![
        3 => accepted.clone().prop_map(Value::from),
        2 => (accepted, extra, any::<bool>())
            .prop_map(|(name, extra, front)| Value::from(if front {
                format!("{extra}{name}")
            } else {
                format!("{name}{extra}")
            })),
        1 => prop::sample::select(accepted_names()).prop_map(|n| Value::from(n.to_uppercase())),
        2 => text().prop_map(Value::from),
        1 => json_value(),
    ]
}

/// A task call: half of them valid, the others nearly so (each field present or not, of the
/// right type or any other, the task a near miss, now and then a field that does not exist).
fn task_call() -> impl Strategy<Value = Value> {
    prop_oneof![call(true), call(false)]
}

fn call(valid: bool) -> BoxedStrategy<Value> {
    let field = move |right: BoxedStrategy<Value>| {
        if valid {
            prop::option::of(right).boxed()
        } else {
            prop_oneof![
                2 => right.prop_map(Some),
                1 => json_value().prop_map(Some),
                2 => Just(None),
            ]
            .boxed()
        }
    };
    let seconds = move |lowest: f64| {
        let in_range = prop_oneof![
            (lowest..MAX_DELAY_SECONDS).prop_map(Value::from),
            (1u64..1000).prop_map(Value::from),
            Just(Value::from(MAX_DELAY_SECONDS)),
        ];
        if valid {
            in_range.boxed()
        } else {
            prop_oneof![in_range, number()].boxed()
        }
    };
    let task = if valid {
        prop::sample::select(accepted_names())
            .prop_map(Value::from)
            .boxed()
    } else {
        task_name().boxed()
    };
    let queue = if valid {
        // Never `amq.`, `unacked` or `_kombu.`: those are refused (tested in the unit tests).
        "[A-Z0-9][A-Za-z0-9._:@-]{0,15}"
            .prop_map(Value::from)
            .boxed()
    } else {
        text().prop_map(Value::from).boxed()
    };
    let extra = if valid {
        Just(None).boxed()
    } else {
        prop::option::weighted(0.1, (text(), json_value())).boxed()
    };
    (
        task,
        field(
            prop::collection::vec(json_value(), 0..6)
                .prop_map(Value::Array)
                .boxed(),
        ),
        field(
            prop::collection::btree_map(text(), json_value(), 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect()))
                .boxed(),
        ),
        field(queue),
        field(seconds(0.0)),
        field(seconds(1e-3)),
        extra,
    )
        .prop_map(|(task, args, kwargs, queue, countdown, expires, extra)| {
            let mut call = Map::new();
            call.insert("task".into(), task);
            for (name, value) in [
                ("args", args),
                ("kwargs", kwargs),
                ("queue", queue),
                ("countdown", countdown),
                ("expires", expires),
            ] {
                if let Some(value) = value {
                    call.insert(name.into(), value);
                }
            }
            if let Some((name, value)) = extra {
                call.insert(name, value);
            }
            Value::Object(call)
        })
        .boxed()
}

/// One change to serialized bytes, as a damaged or hostile client would make.
#[derive(Debug, Clone)]
enum Mutation {
    None,
    Truncate(prop::sample::Index),
    Flip(prop::sample::Index, u8),
    Insert(prop::sample::Index, Vec<u8>),
    Remove(prop::sample::Index, usize),
    /// Arguments wrapped `depth` arrays deep.
    DeepArgs(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let splice = prop_oneof![
        prop::collection::vec(any::<u8>(), 1..8),
        prop::sample::select(vec![
            b"\\u0000".to_vec(),
            b"\\ud800".to_vec(),
            b"\\udfff\\ud800".to_vec(),
            b"\\ud83d\\ude00".to_vec(),
            b"\xff\xfe".to_vec(),
            b"\xc3".to_vec(),
            b"\"".to_vec(),
            b"\\".to_vec(),
            b",".to_vec(),
            b"}".to_vec(),
            b"[".to_vec(),
            b"1e999".to_vec(),
            b"-0".to_vec(),
            b"NaN".to_vec(),
            b"\"task\":\"tasks.add\",".to_vec(),
        ]),
    ];
    let at = any::<prop::sample::Index>;
    prop_oneof![
        6 => Just(Mutation::None),
        1 => at().prop_map(Mutation::Truncate),
        1 => (at(), 1u8..=255).prop_map(|(at, bits)| Mutation::Flip(at, bits)),
        2 => (at(), splice).prop_map(|(at, bytes)| Mutation::Insert(at, bytes)),
        1 => (at(), 1usize..8).prop_map(|(at, n)| Mutation::Remove(at, n)),
        1 => (1usize..400).prop_map(Mutation::DeepArgs),
    ]
}

fn mutate(call: &Value, mutation: &Mutation) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(call).unwrap();
    match mutation {
        Mutation::None => {}
        Mutation::Truncate(at) => bytes.truncate(at.index(bytes.len() + 1)),
        Mutation::Flip(at, bits) => {
            let at = at.index(bytes.len());
            bytes[at] ^= bits;
        }
        Mutation::Insert(at, extra) => {
            let at = at.index(bytes.len() + 1);
            bytes.splice(at..at, extra.iter().copied());
        }
        Mutation::Remove(at, n) => {
            let at = at.index(bytes.len());
            let end = (at + n).min(bytes.len());
            bytes.drain(at..end);
        }
        Mutation::DeepArgs(depth) => {
            let mut call = call.clone();
            let args = call.get("args").cloned().unwrap_or(json!([]));
            let deep = nested(args, *depth, false);
            call["args"] = json!("ARGS");
            bytes = call.to_string().replace("\"ARGS\"", &deep).into_bytes();
        }
    }
    bytes
}

/// Bodies spelled as JSON text by hand: escapes that decode to accepted names, lone surrogates,
/// numbers serde_json writes in no other way.
fn raw_body() -> impl Strategy<Value = Vec<u8>> {
    let escaped_name = prop::collection::vec(
        prop_oneof![
            "[a-z.]{1,4}",
            "\\\\u[0-9a-fA-F]{4}",
            Just("\\u002e".to_string()),
            Just("\\/".to_string()),
            Just("\\\"".to_string()),
        ],
        0..8,
    )
    .prop_map(|parts| parts.concat());
    let raw_number = prop_oneof![
        "-?[0-9]{1,30}(\\.[0-9]{0,30})?([eE][+-]?[0-9]{1,4})?",
        Just("1e309".to_string()),
        Just("-1e-400".to_string()),
        Just("00".to_string()),
        Just("1.".to_string()),
    ];
    let task = prop_oneof![
        escaped_name,
        Just("tasks\\u002eadd".to_string()),
        Just("tasks.\\u0061dd".to_string()),
    ];
    (task, raw_number.clone(), raw_number).prop_map(|(task, countdown, expires)| {
        format!(r#"{{"task":"{task}","args":[1,2],"countdown":{countdown},"expires":{expires}}}"#)
            .into_bytes()
    })
}

// ---------------------------------------------------------------------------------------------
// The oracle

/// What any answer of `parse_submission` must satisfy, given the body it read.
fn check_parse(body: &[u8], accepts: &Accepts) -> Result<(), TestCaseError> {
    let answer = parse_submission(body, accepts);
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    match answer {
        Ok(submission) => {
            let Some(value) = parsed else {
                return Err(TestCaseError::fail("a body that is not JSON made a job"));
            };
            check_submission(&submission, &value, accepts)?;
        }
        Err(error) => check_refusal(&error, parsed.is_some())?,
    }
    Ok(())
}

/// A workflow is the body's list of task calls under its kind; anything else is one job.
fn check_submission(
    submission: &Submission,
    value: &Value,
    accepts: &Accepts,
) -> Result<(), TestCaseError> {
    match submission {
        Submission::Job(job) => check_job(job, value, accepts),
        Submission::Workflow { kind, steps } => {
            let Some(calls) = value.get(kind.name()).and_then(Value::as_array) else {
                return Err(TestCaseError::fail(format!(
                    "not a {}: {value}",
                    kind.name()
                )));
            };
            prop_assert!(value.get("task").is_none(), "{}", value);
            prop_assert_eq!(calls.len(), steps.len());
            for (step, call) in steps.iter().zip(calls) {
                prop_assert!(call.get("task").is_some(), "{}", call);
                check_job(step, call, accepts)?;
            }
            Ok(())
        }
    }
}

/// A job is the body's task call, or the body as the default task's one argument.
fn check_job(job: &JobRequest, value: &Value, accepts: &Accepts) -> Result<(), TestCaseError> {
    prop_assert!(
        accepts.tasks.contains(&job.task),
        "task {:?} is not accepted",
        job.task
    );
    match value.as_object().filter(|call| call.contains_key("task")) {
        Some(call) => {
            prop_assert_eq!(Some(job.task.as_str()), call["task"].as_str());
            let or_empty = |field: &str, empty: Value| match call.get(field) {
                None | Some(Value::Null) => empty,
                Some(given) => given.clone(),
            };
            prop_assert_eq!(Value::Array(job.args.clone()), or_empty("args", json!([])));
            prop_assert_eq!(
                Value::Object(job.kwargs.clone()),
                or_empty("kwargs", json!({}))
            );
            prop_assert!(job
                .queue
                .as_ref()
                .is_none_or(|q| runtime::broker::queue_name_problem(q).is_none()));
            prop_assert!(job
                .countdown
                .is_none_or(|s| (0.0..=MAX_DELAY_SECONDS).contains(&s)));
            prop_assert!(job
                .expires
                .is_none_or(|s| s > 0.0 && s <= MAX_DELAY_SECONDS));
        }
        None => {
            let names_a_workflow = value.as_object().is_some_and(|fields| {
                fields.len() == 1
                    && Kind::ALL
                        .iter()
                        .any(|k| fields.get(k.name()).is_some_and(Value::is_array))
            });
            prop_assert!(
                !names_a_workflow,
                "a workflow was read as a payload: {}",
                value
            );
            prop_assert_eq!(&job.task, &accepts.default_task);
            prop_assert_eq!(&job.args, &vec![value.clone()]);
            prop_assert!(job.kwargs.is_empty() && job.queue.is_none());
            prop_assert!(job.countdown.is_none() && job.expires.is_none());
        }
    }
    Ok(())
}

/// A refusal is the client's fault, says so with a reason, and is the right kind: 400 for
/// what is not JSON, 422 for JSON whose fields are wrong.
fn check_refusal(error: &Error, was_json: bool) -> Result<(), TestCaseError> {
    let status = error.status();
    prop_assert_eq!(
        status,
        if was_json {
            Status::UnprocessableEntity
        } else {
            Status::BadRequest
        },
        "{}",
        error
    );
    prop_assert!(!error.to_string().trim().is_empty());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Through Rocket: the real body guard, the real error answers, nothing stored.

#[rocket::post("/receive", data = "<received>")]
fn receive(received: Result<Received, Error>) -> Result<Json<Value>, Error> {
    let tasks: Vec<String> = match received?.submission {
        Submission::Job(job) => vec![job.task],
        Submission::Workflow { steps, .. } => steps.into_iter().map(|step| step.task).collect(),
    };
    Ok(Json(json!({ "tasks": tasks })))
}

fn app() -> Client {
    let figment = rocket::Config::figment()
        .merge(("log_level", rocket::config::LogLevel::Off))
        .merge(("cli_colors", false));
    let rocket = rocket::custom(figment)
        .manage(accepts())
        .mount("/", rocket::routes![receive])
        .register("/", rocket::catchers![web::error::catch_all]);
    Client::untracked(rocket).expect("the test app builds")
}

/// Posts `body` with `content_type` and checks the answer: 200 with an accepted task, or a 4xx
/// whose body is exactly `{"error": reason}`: 415 for a type not read as JSON, else 413 for a
/// body over the limit.
fn check_http(
    app: &Client,
    body: Vec<u8>,
    (content_type, read_as_json): (Option<ContentType>, bool),
) -> Result<(), TestCaseError> {
    let too_large = body.len() as u64 > BODY_LIMIT;
    let mut request = app.post("/receive").body(body);
    if let Some(content_type) = content_type {
        request = request.header(content_type);
    }
    let response = request.dispatch();
    let status = response.status();
    let answer = response.into_string().unwrap_or_default();
    let answer: Value = serde_json::from_str(&answer)
        .map_err(|e| TestCaseError::fail(format!("{status}: not JSON ({e}): {answer:?}")))?;
    if status == Status::Ok {
        prop_assert!(read_as_json && !too_large, "{answer}");
        let tasks = answer["tasks"].as_array().cloned().unwrap_or_default();
        prop_assert!(!tasks.is_empty(), "{answer}");
        for task in tasks {
            let task = task.as_str().unwrap_or_default();
            prop_assert!(accepts().tasks.contains(task), "{answer}");
        }
    } else {
        prop_assert!(
            (400..500).contains(&status.code),
            "{status} for a client's body: {answer}"
        );
        let reason = answer
            .as_object()
            .filter(|fields| fields.len() == 1)
            .and_then(|fields| fields.get("error"))
            .and_then(Value::as_str);
        prop_assert!(
            reason.is_some_and(|r| !r.trim().is_empty()),
            "{status} without a JSON reason: {answer}"
        );
        if !read_as_json {
            prop_assert_eq!(status, Status::UnsupportedMediaType);
        } else if too_large {
            prop_assert_eq!(status, Status::PayloadTooLarge);
        }
    }
    Ok(())
}

/// A request's content type (or none), and whether the app reads such a body as JSON.
fn content_type() -> impl Strategy<Value = (Option<ContentType>, bool)> {
    prop_oneof![
        4 => Just((Some(ContentType::JSON), true)),
        // The test app requires no credential: only JSON types are read.
        2 => Just((None, false)),
        1 => Just((Some(ContentType::Form), false)),
        1 => Just((Some(ContentType::new("application", "vnd.api+json")), true)),
        1 => Just((Some(ContentType::Plain), false)),
        1 => Just((Some(ContentType::XML), false)),
        1 => Just((Some(ContentType::Binary), false)),
    ]
}

/// A body of any kind this file generates.
/// A workflow of task calls, valid or not (a call may carry fields a step does not take), at
/// times with a stray field beside its kind, or its calls as something other than a list.
fn workflow() -> impl Strategy<Value = Value> {
    let kind = prop_oneof![Just(Kind::Chain), Just(Kind::Group)];
    let steps = prop_oneof![
        4 => prop::collection::vec(task_call(), 0..5).prop_map(Value::Array),
        1 => json_value(),
    ];
    let stray = prop::option::of((text(), json_value()));
    (kind, steps, stray).prop_map(|(kind, steps, stray)| {
        let mut fields = Map::new();
        fields.insert(kind.name().into(), steps);
        if let Some((field, value)) = stray {
            fields.insert(field, value);
        }
        Value::Object(fields)
    })
}

fn any_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        workflow().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        prop::collection::vec(any::<u8>(), 0..(2 * BODY_LIMIT as usize)),
        json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        (task_call(), mutation()).prop_map(|(call, m)| mutate(&call, &m)),
        raw_body(),
        (json_value(), 0usize..600, any::<bool>())
            .prop_map(|(v, depth, objects)| nested(v, depth, objects).into_bytes()),
        (0usize..3000).prop_map(|n| format!("[\"{}\"]", "x".repeat(n)).into_bytes()),
    ]
}

proptest! {
    #[test]
    fn an_idempotency_key_is_taken_iff_it_is_1_to_255_printable_ascii(value in "\\PC{0,300}|[ -~]{0,300}|\"[ -~]{0,260}\"") {
        let inner = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(&value);
        let valid = (1..=MAX_KEY_CHARS).contains(&inner.len())
            && inner.bytes().all(|b| (0x20..=0x7e).contains(&b));
        match parse_key(&value) {
            Ok(key) => prop_assert!(valid && key == inner, "{value:?} taken as {key:?}"),
            Err(error) => {
                prop_assert!(!valid, "{value:?} refused: {error}");
                prop_assert_eq!(error.status(), Status::BadRequest);
            }
        }
    }

    #[test]
    fn any_bytes_are_a_job_or_a_400(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        check_parse(&bytes, &accepts())?;
    }

    #[test]
    fn any_json_is_a_job_or_a_422(value in json_value()) {
        check_parse(&serde_json::to_vec(&value).unwrap(), &accepts())?;
    }

    #[test]
    fn valid_task_calls_are_jobs(call in call(true)) {
        let body = serde_json::to_vec(&call).unwrap();
        // Save text holding NUL, which jsonb cannot store: that is a 422 naming it.
        let parsed = parse_submission(&body, &accepts());
        if call.to_string().contains("\\u0000") {
            prop_assert!(
                matches!(&parsed, Err(e) if e.status() == Status::UnprocessableEntity
                    && e.to_string().contains("NUL")),
                "{}: {:?}", call, parsed.map(|_| ())
            );
        } else {
            prop_assert!(parsed.is_ok(), "{}", call);
        }
        check_parse(&body, &accepts())?;
    }

    #[test]
    fn workflows_are_a_workflow_or_a_422(workflow in workflow()) {
        check_parse(&serde_json::to_vec(&workflow).unwrap(), &accepts())?;
    }

    #[test]
    fn workflows_of_plain_valid_calls_are_workflows(
        kind in prop_oneof![Just(Kind::Chain), Just(Kind::Group)],
        calls in prop::collection::vec(call(true), 1..5),
    ) {
        // Without the fields a step does not take, and text a jsonb can store.
        let steps: Vec<Value> = calls
            .into_iter()
            .map(|mut call| {
                let fields = call.as_object_mut().unwrap();
                fields.remove("countdown");
                fields.remove("expires");
                call
            })
            .filter(|call| !call.to_string().contains("\\u0000"))
            .collect();
        prop_assume!(!steps.is_empty());
        let body = serde_json::to_vec(&json!({kind.name(): steps})).unwrap();
        let parsed = parse_submission(&body, &accepts());
        prop_assert!(
            matches!(&parsed, Ok(Submission::Workflow { kind: read, steps: got }) if *read == kind && got.len() == steps.len()),
            "{}: {:?}", String::from_utf8_lossy(&body), parsed
        );
        check_parse(&body, &accepts())?;
    }

    #[test]
    fn task_calls_valid_or_mutated_are_a_job_or_a_4xx(
        call in task_call(),
        mutation in mutation(),
    ) {
        check_parse(&mutate(&call, &mutation), &accepts())?;
    }

    #[test]
    fn hand_spelled_json_is_a_job_or_a_4xx(body in raw_body()) {
        check_parse(&body, &accepts())?;
    }

    #[test]
    fn deep_nesting_is_a_job_or_a_400(
        value in json_value(),
        depth in 0usize..5000,
        objects in any::<bool>(),
    ) {
        check_parse(nested(value, depth, objects).as_bytes(), &accepts())?;
    }
}

/// One app for all cases (`PROPTEST_CASES` of them, as in `proptest!`).
#[test]
fn through_rocket_every_answer_is_a_job_or_a_json_4xx() {
    let app = app();
    let mut runner = TestRunner::new(ProptestConfig {
        source_file: Some(file!()),
        ..ProptestConfig::default()
    });
    let result = runner.run(&(any_body(), content_type()), |(body, content_type)| {
        check_http(&app, body, content_type)
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
}

/// Fixed cases the properties must agree with, whatever the random draw.
#[test]
fn known_bodies() {
    let accepts = accepts();
    let ok = |body: &str| match parse_submission(body.as_bytes(), &accepts).unwrap() {
        Submission::Job(job) => job.task,
        workflow => panic!("{body} is not one job: {workflow:?}"),
    };
    assert_eq!(ok(r#"{"task":"tasks\u002eadd","args":[1,2]}"#), "tasks.add");
    assert_eq!(
        ok(r#"{"task":"proj.tâches.ünïcode"}"#),
        "proj.tâches.ünïcode"
    );
    assert_eq!(ok(&nested(json!(1), 120, false)), "tasks.echo");
    let status = |body: &str| {
        parse_submission(body.as_bytes(), &accepts)
            .unwrap_err()
            .status()
    };
    assert_eq!(status(&nested(json!(1), 200, false)), Status::BadRequest);
    assert_eq!(status(r#"{"task":"tasks\ud800"}"#), Status::BadRequest);
    assert_eq!(
        status(r#"{"task":"TASKS.ADD"}"#),
        Status::UnprocessableEntity
    );
    assert_eq!(
        status(r#"{"task":"tasks.add","countdown":1e999}"#),
        Status::BadRequest
    );
    assert_eq!(
        status(r#"{"task":"tasks.add","expires":-0}"#),
        Status::UnprocessableEntity
    );
    for body in [
        nested(json!({"task": "tasks.add"}), 1000, true),
        "[".repeat(100_000),
        "{\"a\":".repeat(100_000),
    ] {
        assert_eq!(status(&body), Status::BadRequest);
    }
    for body in [
        format!("{:?}", String::from_utf8_lossy(&[0xff; 4])),
        String::new(),
    ] {
        let _ = parse_submission(body.as_bytes(), &accepts);
    }
}
