"""A worker node's life on the broker: its Redis transport (:mod:`.broker`), the leases on the
messages it holds (:mod:`.leases`), its soft shutdown (:mod:`.shutdown`) and its share of the
stalled-run repair (:mod:`.watchdog`). Design note: ``ops/design/sink.md`` ("Leases")."""
