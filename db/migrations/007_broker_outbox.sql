-- PAYSTREAM_BROKER (NATS JetStream) instead of Postgres LISTEN/NOTIFY: every logged event
-- is queued here in the database transaction that logs it (instead of a NOTIFY), and
-- published to JetStream after commit (push/listener_nats.py) with the message id
-- "<transaction id>:<seq>", so JetStream drops a second publish of the same event.  The
-- row is deleted in the transaction that claimed it, once JetStream has acknowledged it;
-- a process that dies between commit and publish leaves its rows here, and whichever
-- process claims them next (every process looks each second) publishes them.
--
-- A row is only a pointer, written by the very statement that logs the event: the message
-- carries the log row's data, read at publish time.
-- Without PAYSTREAM_BROKER nothing writes here.
CREATE TABLE broker_outbox (
  id             bigserial PRIMARY KEY,
  transaction_id text NOT NULL,
  seq            integer NOT NULL,
  queued_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);  -- no foreign key: rows are only ever inserted from the log row's own INSERT ... RETURNING
