-- What every process that applies events must run: the effects this database expects
-- (PAYSTREAM_EFFECTS) and whether it queues signed webhooks for the merchant's backend
-- (PAYSTREAM_OUTBOUND_URL).  `paystream migrate` records its environment's; `serve`
-- refuses to start with other effects, and the commands that apply events (backfill,
-- events --reprocess, reconcile) run the recorded ones whatever their own environment
-- says, so no event is applied without an effect the database's other events had.
CREATE TABLE paystream_config (
  key         text PRIMARY KEY,
  value       jsonb NOT NULL,
  recorded_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
