"""The write path: decide what an event does to a transaction (lifecycle), move it and run
its effects (transitions), and the SQL that stores, logs and NOTIFYs (store)."""
