-- Every call of the test effects, and the switch that makes the Python one fail.
CREATE TABLE probe_calls (
  transaction_id  text NOT NULL,
  seq             integer NOT NULL,
  status          text NOT NULL,
  previous_status text,
  cause_type      text
);
CREATE TABLE probe_switch (broken boolean NOT NULL);
INSERT INTO probe_switch VALUES (true);

CREATE TABLE probe_sql_calls (transaction_id text NOT NULL, seq integer NOT NULL, previous_status text);
CREATE FUNCTION probe_sql_on_status(txn jsonb, previous_status text) RETURNS jsonb
LANGUAGE sql AS $$
  INSERT INTO probe_sql_calls VALUES (txn ->> 'id', (txn ->> 'seq')::integer, previous_status)
  RETURNING jsonb_build_object('sql_probe', txn -> 'seq')
$$;
