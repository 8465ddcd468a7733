-- How long a manual-capture payment's authorisation is held before paystream releases it
-- (the recovery sweeper's expire_authorization), per transaction: POST /v1/transactions
-- `authorization_days`, 7 unless asked, up to 31 (card networks let lodging and similar
-- merchants hold an authorisation that long).  NULL for a transaction created without
-- manual capture, and for those created before this column: the sweeper reads NULL as 7,
-- the lifetime every authorisation had until now.
ALTER TABLE transactions
  ADD COLUMN authorization_days smallint CHECK (authorization_days BETWEEN 1 AND 31);

-- The sweeper looks for held authorisations each pass.
CREATE INDEX transactions_requires_capture_idx ON transactions (updated_at) WHERE status = 'requires_capture';
