-- Example effect (SQL): sales made on an external landing page are acknowledged and
-- kept, nothing else.  A transaction whose metadata has advertiserId, sizeId and
-- publicationId is recorded once, when its money has arrived.
-- Enable with PAYSTREAM_EFFECTS=sql:public.ad_sales_on_status after
-- `paystream migrate --dir examples/ad_sales/migrations`.
CREATE TABLE IF NOT EXISTS ad_sales (
  payment_intent_id text PRIMARY KEY,
  transaction_id    text NOT NULL UNIQUE REFERENCES transactions (id),
  advertiser_id     text NOT NULL,
  size_id           text NOT NULL,
  publication_id    text NOT NULL,
  amount            bigint NOT NULL,
  currency          text NOT NULL,
  created_at        timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- paystream calls this once for every event it logs for a transaction, inside the
-- database transaction that logs it: txn is the pushed transaction JSON.
CREATE OR REPLACE FUNCTION ad_sales_on_status(txn jsonb, previous_status text)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE meta jsonb := txn -> 'metadata';
BEGIN
  IF txn ->> 'status' IN ('succeeded', 'partially_refunded', 'refunded', 'disputed')
     AND coalesce(meta ->> 'advertiserId', '') <> ''
     AND coalesce(meta ->> 'sizeId', '') <> ''
     AND coalesce(meta ->> 'publicationId', '') <> '' THEN
    INSERT INTO ad_sales (payment_intent_id, transaction_id, advertiser_id, size_id, publication_id,
                          amount, currency)
    VALUES (coalesce(txn ->> 'stripe_id', txn ->> 'id'), txn ->> 'id', meta ->> 'advertiserId',
            meta ->> 'sizeId', meta ->> 'publicationId', (txn ->> 'amount')::bigint, txn ->> 'currency')
    ON CONFLICT DO NOTHING;
  END IF;
END
$$;
