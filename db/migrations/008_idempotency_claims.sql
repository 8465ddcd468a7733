-- Idempotency-Key on POST /v1/transactions: only the request holding the key's claim calls
-- Stripe.  The claim is committed before the call (no transaction stays open across it, so
-- this works through a transaction-mode pooler); concurrent requests with the same key see
-- it and wait for the holder's answer.  The holder renews claimed_until while its call
-- runs, so a claim whose holder died lapses on its own and a retry takes the key over; a
-- holder that failed with a 5xx clears it at once.  `claim` names the holder, so a holder
-- whose claim was taken over never clears or renews its successor's.
ALTER TABLE idempotency_keys
  ADD COLUMN claim         text,
  ADD COLUMN claimed_until timestamptz;
