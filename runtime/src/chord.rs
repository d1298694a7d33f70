//! The chord join as Celery's Redis result backend keeps it, so header tasks run by Python and
//! by Rust workers finish the same chord. Keys are `celery-taskset-meta-<chord id>` plus:
//!
//! - `.s`: the header's size, set by the client that applied the chord;
//! - `.t`: members added later (a counter);
//! - `.j`: the members' outcomes, a sorted set scored by `group_index`, each `[1, id, state,
//!   result]` as JSON;
//! - `.d`: `"<id>:<index>"` of each member counted, so a member that ran twice counts once;
//! - `.c`: the claim on sending the body: a token while one worker sends it, then `done`.
//!
//! A chord that failed keeps its `.j` (see [`finish_failed`]).
//!
//! The key itself holds the header's result tuple when a member ends in a group (saved by the
//! client, as Celery's `apply_chord` does): the body then gets that member's results as a list.
//!
//! The member that completes the count claims `.c` in the same atomic step, so exactly one
//! worker reads the outcomes and sends the body.

use std::collections::HashMap;
use std::sync::LazyLock;

use serde_json::{json, Value};

use crate::backend::RedisBackend;
use crate::error::{Error, Result};
use crate::protocol::result::{state, ExceptionInfo};

/// Counts a member's outcome and, when it completes the chord, claims sending the body.
/// KEYS: `.j`, `.t`, `.s`, `.d`, the chord's meta key, `.c`. ARGV: member id, entry, index,
/// expiry seconds (0: none), claim seconds, claim token. Returns 1 when the caller holds the
/// claim, 0 otherwise (not complete yet, another worker claimed it, or the chord is done).
static COUNT_MEMBER: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local joined, extra, size_key, counted, meta, claim = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
if redis.call('GET', claim) == 'done' then return 0 end
local member = ARGV[1] .. ':' .. ARGV[3]
if redis.call('SADD', counted, member) == 1 then
  redis.call('ZADD', joined, ARGV[3], ARGV[2])
end
local expiry = tonumber(ARGV[4])
if expiry > 0 then
  for _, key in ipairs({joined, extra, size_key, counted, meta}) do
    redis.call('EXPIRE', key, expiry)
  end
end
local size = redis.call('GET', size_key)
if not size then return 0 end
local wanted = tonumber(size) + tonumber(redis.call('GET', extra) or '0')
if redis.call('ZCARD', joined) ~= wanted then return 0 end
if redis.call('SET', claim, ARGV[6], 'NX', 'EX', tonumber(ARGV[5])) then return 1 end
return 0
"#,
    )
});

/// Ends a chord settled under the claim ARGV[1]: drops the keys after the claim (`KEYS[2..]`)
/// and marks it done for ARGV[2] seconds, so a member that runs again later cannot start it
/// over. KEYS: `.c`, then the keys to drop.
static FINISH: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if #KEYS > 1 then redis.call('DEL', unpack(KEYS, 2)) end
redis.call('SET', KEYS[1], 'done', 'EX', tonumber(ARGV[2]))
return 1
"#,
    )
});

/// How long a claim holds: a worker that dies holding it leaves the chord to expire.
const CLAIM_SECONDS: u64 = 10;
/// How long a finished chord stays marked done.
const DONE_SECONDS: u64 = 300;

fn key(chord_id: &str, suffix: &str) -> String {
    format!("celery-taskset-meta-{chord_id}{suffix}")
}

/// The outcome of a header member.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub task_id: String,
    pub state: String,
    pub result: Value,
}

/// What counting a member led to.
#[derive(Debug, Clone, PartialEq)]
pub enum Join {
    /// Not complete, or another worker sends the body.
    Waiting,
    /// This worker completed the chord: here are the members in header order, the header's
    /// result tuple if one was saved (see [`results`]), and the claim to hand back with
    /// [`finish`] once the body is sent.
    Complete {
        members: Vec<Member>,
        header: Option<Value>,
        claim: String,
    },
}

/// Records that chord `chord_id` has `size` header members, before they are sent, as Celery's
/// client does: the size, no claim left from an earlier run of the same chord id, and the
/// header's result tuple when it is to shape the body's argument (see [`results`]). A chord
/// needs a result backend: without one this is an error.
pub async fn open(
    backend: Option<&RedisBackend>,
    chord_id: &str,
    size: usize,
    header: Option<&Value>,
) -> Result<()> {
    let backend =
        backend.ok_or_else(|| Error::InvalidOption("a chord needs a result backend".into()))?;
    if let Some(header) = header {
        backend.save_group_tuple(chord_id, header).await?;
    }
    let mut set = redis::cmd("SET");
    set.arg(key(chord_id, ".s")).arg(size);
    if backend.expires() > 0 {
        set.arg("EX").arg(backend.expires());
    }
    redis::pipe()
        .atomic()
        .del(key(chord_id, ".c"))
        .add_command(set)
        .query_async::<()>(&mut backend.connection())
        .await?;
    Ok(())
}

/// Counts `added` more members in chord `chord_id`, which a header member adds while it runs
/// (`.t`, as Celery's `add_to_chord`): the chord then waits for them too.
pub async fn extend(backend: &RedisBackend, chord_id: &str, added: usize) -> Result<()> {
    redis::cmd("INCRBY")
        .arg(key(chord_id, ".t"))
        .arg(added)
        .query_async::<()>(&mut backend.connection())
        .await?;
    Ok(())
}

/// Counts `member` (at `index` in the header) in chord `chord_id`.
pub async fn count(
    backend: &RedisBackend,
    chord_id: &str,
    index: Option<u64>,
    member: &Member,
) -> Result<Join> {
    let score = index.map_or_else(|| "+inf".to_string(), |i| i.to_string());
    let entry = json!([1, member.task_id, member.state, member.result]).to_string();
    let claim = uuid::Uuid::new_v4().simple().to_string();
    let mut connection = backend.connection();
    let claimed: i64 = COUNT_MEMBER
        .key(key(chord_id, ".j"))
        .key(key(chord_id, ".t"))
        .key(key(chord_id, ".s"))
        .key(key(chord_id, ".d"))
        .key(key(chord_id, ""))
        .key(key(chord_id, ".c"))
        .arg(&member.task_id)
        .arg(entry)
        .arg(score)
        .arg(backend.expires())
        .arg(CLAIM_SECONDS)
        .arg(&claim)
        .invoke_async(&mut connection)
        .await?;
    if claimed == 0 {
        return Ok(Join::Waiting);
    }
    let read: redis::RedisResult<(Vec<String>, Option<String>)> = redis::pipe()
        .cmd("ZRANGE")
        .arg(key(chord_id, ".j"))
        .arg(0)
        .arg(-1)
        .cmd("GET")
        .arg(key(chord_id, ""))
        .query_async(&mut connection)
        .await;
    let (entries, saved) = match read {
        Ok(read) => read,
        Err(error) => {
            // Not ours to keep: the member's next delivery claims it again.
            let _ = release(backend, chord_id, &claim).await;
            return Err(error.into());
        }
    };
    let members = entries
        .iter()
        .filter_map(|entry| match serde_json::from_str::<Value>(entry) {
            Ok(Value::Array(fields)) if fields.len() == 4 => Some(Member {
                task_id: fields[1].as_str().unwrap_or_default().to_string(),
                state: fields[2].as_str().unwrap_or_default().to_string(),
                result: fields[3].clone(),
            }),
            _ => None,
        })
        .collect();
    // A group result saved under the chord's id (a header with a member ending in a group, as
    // Celery's `apply_chord` saves it) shapes the body's argument.
    let header = saved
        .and_then(|text| serde_json::from_str::<Value>(&text).ok())
        .and_then(|mut saved| saved.get_mut("result").map(Value::take));
    Ok(Join::Complete {
        members,
        header,
        claim,
    })
}

/// The body's argument: each member's result in header order, or, when the header's result
/// tuple was saved, shaped as it is (Celery restores that group result and joins it): a member
/// ending in a group gives the list of that group's results. `None` when the tuple names a
/// task that is no counted member.
pub fn results(members: Vec<Member>, header: Option<&Value>) -> Option<Vec<Value>> {
    let Some(header) = header else {
        return Some(members.into_iter().map(|m| m.result).collect());
    };
    let by_id: HashMap<String, Value> =
        members.into_iter().map(|m| (m.task_id, m.result)).collect();
    match joined(header, &by_id)? {
        Value::Array(results) => Some(results),
        _ => None,
    }
}

/// The result a tuple `[[id, parent], members]` stands for: a group's (members a list) as the
/// list of its members' results, a task's (members null) as found in `by_id`.
fn joined(tuple: &Value, by_id: &HashMap<String, Value>) -> Option<Value> {
    match tuple.get(1) {
        Some(Value::Array(members)) => members
            .iter()
            .map(|member| joined(member, by_id))
            .collect::<Option<Vec<_>>>()
            .map(Value::Array),
        _ => by_id.get(tuple.get(0)?.get(0)?.as_str()?).cloned(),
    }
}

/// Marks chord `chord_id` done under `claim` after its body was sent, dropping its data.
pub async fn finish(backend: &RedisBackend, chord_id: &str, claim: &str) -> Result<()> {
    settle(backend, chord_id, claim, &[".j", ".t", ".s", ".d"]).await
}

/// Marks chord `chord_id` done under `claim` after it failed. Only its size goes: the members'
/// outcomes stay in `.j` until they expire, as Celery leaves them, for whoever looks into the
/// failure.
pub async fn finish_failed(backend: &RedisBackend, chord_id: &str, claim: &str) -> Result<()> {
    settle(backend, chord_id, claim, &[".s"]).await
}

async fn settle(
    backend: &RedisBackend,
    chord_id: &str,
    claim: &str,
    dropped: &[&str],
) -> Result<()> {
    let mut script = FINISH.key(key(chord_id, ".c"));
    for suffix in dropped {
        script.key(key(chord_id, suffix));
    }
    script
        .arg(claim)
        .arg(DONE_SECONDS)
        .invoke_async::<i64>(&mut backend.connection())
        .await?;
    Ok(())
}

/// Gives back the claim on chord `chord_id` (if still ours) without ending the chord, so that
/// the next delivery of a member can claim it and send the body.
pub async fn release(backend: &RedisBackend, chord_id: &str, claim: &str) -> Result<()> {
    backend.delete_if_held(&key(chord_id, ".c"), claim).await
}

/// What the body fails with when a member failed: `ChordError` naming the member, as Celery
/// words it, or, for a body that is a group (whose tasks Celery fails one by one), the
/// member's own exception; `None` when every member succeeded.
pub fn failure(members: &[Member], body_is_group: bool) -> Option<ExceptionInfo> {
    let failed = members
        .iter()
        .find(|m| m.state == state::FAILURE || m.state == state::REVOKED)?;
    let raised = serde_json::from_value::<ExceptionInfo>(failed.result.clone());
    if let (true, Ok(raised)) = (body_is_group, &raised) {
        return Some(raised.clone());
    }
    let raised = raised
        .map(|exc| exc.repr())
        .unwrap_or_else(|_| failed.result.to_string());
    Some(ExceptionInfo::celery(
        "ChordError",
        format!("Dependency {} raised {raised}", failed.task_id),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, state: &str, result: Value) -> Member {
        Member {
            task_id: id.into(),
            state: state.into(),
            result,
        }
    }

    #[test]
    fn a_failed_member_names_itself_in_the_chord_error() {
        let boom = ExceptionInfo::builtin("RuntimeError", "boom").to_value();
        let members = [
            member("a", "SUCCESS", json!(1)),
            member("b", "FAILURE", boom),
        ];
        let error = failure(&members, false).unwrap();
        assert_eq!(
            (error.exc_module.as_str(), error.exc_type.as_str()),
            ("celery.exceptions", "ChordError")
        );
        assert_eq!(error.message(), "Dependency b raised RuntimeError('boom')");
        assert_eq!(failure(&members[..1], false), None);
    }

    #[test]
    fn a_group_body_fails_with_the_members_own_exception() {
        let boom = ExceptionInfo::builtin("RuntimeError", "boom");
        let members = [member("b", "FAILURE", boom.to_value())];
        assert_eq!(failure(&members, true), Some(boom));
    }

    #[test]
    fn a_saved_header_gives_a_group_members_results_as_one_list() {
        let members = vec![
            member("b", "SUCCESS", json!(2)),
            member("c", "SUCCESS", json!(3)),
            member("d", "SUCCESS", json!(4)),
        ];
        let task = |id: &str| json!([[id, null], null]);
        // chord([chain(a, group(b, c)), d], body), the group's tuple with its parent a.
        let header = json!([
            ["ch", null],
            [
                [["g", [["a", null], null]], [task("b"), task("c")]],
                task("d")
            ]
        ]);
        assert_eq!(
            results(members.clone(), Some(&header)),
            Some(vec![json!([2, 3]), json!(4)])
        );
        assert_eq!(
            results(members.clone(), None),
            Some(vec![json!(2), json!(3), json!(4)])
        );
        let stranger = json!([["ch", null], [task("x")]]);
        assert_eq!(results(members, Some(&stranger)), None);
    }
}
