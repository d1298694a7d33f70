//! The Diesel schema of `migrations/`.

diesel::table! {
    tasks (task_id) {
        task_id -> Uuid,
        task_name -> Text,
        args -> Jsonb,
        kwargs -> Jsonb,
        queue -> Text,
        state -> Text,
        state_rank -> SmallInt,
        progress_current -> Nullable<BigInt>,
        progress_total -> Nullable<BigInt>,
        meta -> Nullable<Jsonb>,
        result -> Nullable<Jsonb>,
        error_type -> Nullable<Text>,
        error_message -> Nullable<Text>,
        traceback -> Nullable<Text>,
        worker -> Nullable<Text>,
        retries -> Integer,
        published_at -> Nullable<Timestamptz>,
        publish_error -> Nullable<Text>,
        created_at -> Timestamptz,
        started_at -> Nullable<Timestamptz>,
        finished_at -> Nullable<Timestamptz>,
        updated_at -> Timestamptz,
        eta -> Nullable<Timestamptz>,
        expires -> Nullable<Timestamptz>,
        publish_lease_until -> Nullable<Timestamptz>,
        workflow_id -> Nullable<Uuid>,
        workflow_kind -> Nullable<Text>,
        workflow_position -> Nullable<Integer>,
        publish_attempts -> Integer,
        next_attempt_at -> Nullable<Timestamptz>,
        unique_key -> Nullable<Text>,
        unique_for -> Nullable<BigInt>,
        traceparent -> Nullable<Text>,
        tracestate -> Nullable<Text>,
    }
}

diesel::table! {
    idempotency_keys (scope, key) {
        scope -> Text,
        key -> Text,
        body_sha256 -> Bytea,
        task_id -> Uuid,
        workflow_kind -> Nullable<Text>,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    task_history (task_id) {
        task_id -> Uuid,
        name -> Nullable<Text>,
        state -> Text,
        state_rank -> SmallInt,
        args -> Nullable<Text>,
        kwargs -> Nullable<Text>,
        worker -> Nullable<Text>,
        queue -> Nullable<Text>,
        sent_at -> Nullable<Timestamptz>,
        received_at -> Nullable<Timestamptz>,
        started_at -> Nullable<Timestamptz>,
        finished_at -> Nullable<Timestamptz>,
        runtime -> Nullable<Double>,
        result -> Nullable<Text>,
        exception -> Nullable<Text>,
        traceback -> Nullable<Text>,
        retries -> Integer,
        root_id -> Nullable<Uuid>,
        parent_id -> Nullable<Uuid>,
        seen_at -> Timestamptz,
        checked_at -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    workers (hostname) {
        hostname -> Text,
        last_heartbeat -> Timestamptz,
        freq -> Double,
        active -> Integer,
        processed -> BigInt,
        online -> Bool,
        software -> Nullable<Text>,
    }
}
